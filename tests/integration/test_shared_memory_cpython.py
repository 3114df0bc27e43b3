# ruff: noqa: PT009, PT027, F841
"""CPython's own tests of ``multiprocessing.shared_memory``, run against
``shmbroker.shared_memory``.

Source: class ``_TestSharedMemory`` of ``Lib/test/_test_multiprocessing.py``
from CPython 3.11.2 as Debian 12 ships it (package libpython3.11-testsuite
3.11.2-6+deb12u9, /usr/lib/python3.11/test/_test_multiprocessing.py, lines
3834-4350).  Copyright (c) 2001-2023 Python Software Foundation; All Rights
Reserved.  Used under the PSF License Agreement (version 2), which permits
derived works given this notice; see https://docs.python.org/3/license.html.
CPython 3.13's additions to these tests (``track=``) are tested, inverted, in
tests/integration/test_shared_memory.py.

Changes, each marked ADAPTED or INVERTED where it is made; the bodies are
otherwise CPython's (reformatted by ruff):

* signatures: annotated for mypy (pyproject.toml relaxes only strict
  optional checking for this file, so the bodies stay CPython's).
* imports: ``from shmbroker import shared_memory``; the patch target
  ``shmbroker.shared_memory._make_filename``; ``SharedMemoryManager`` from
  ``shmbroker.shared_memory`` instead of ``multiprocessing.managers``.
* harness: ``BaseTestCase`` (which makes one class per start method) is
  ``unittest.TestCase`` with one subclass for ``fork``, Linux's default
  start method through 3.13 (CPython's test_multiprocessing_fork).  The
  spawn and forkserver start methods launch multiprocessing's own
  resource tracker and fork server, processes that outlive a test and that
  the suite's leak check would end; tests/integration/test_shared_memory.py attaches
  from freshly started interpreters instead.  The
  ``hashlib_helper.requires_hashdigest('md5')`` and ``HAS_SHMEM`` guards
  are dropped (no manager connection to authenticate; always present).
* ``test_shared_memory_SharedMemoryServer_ignores_sigint``: the line
  sending SIGINT to ``smm._process`` is removed: there is no manager
  process.  The rest (the manager keeps working, the parent's own SIGINT
  handling is untouched) runs.
* ``test_shared_memory_SharedMemoryManager_reuses_resource_tracker``: runs
  its script with ``subprocess`` instead of ``test.support.script_helper``;
  the assertion (nothing on stderr) is CPython's.
* ``test_shared_memory_cleaned_after_process_termination``: INVERTED
  (tracker-specific): the segment of a terminated creator survives, with
  its bytes, and nothing is printed; the test then unlinks it.

Not vendored: ``TestResourceTracker`` (it tests the resource tracker
process itself, which ``shmbroker.shared_memory`` does not use) and the
``multiprocessing.managers`` proxy tests (no manager process).  Nothing in
``_TestSharedMemory`` is skipped.
"""

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import unittest
import unittest.mock
import warnings
from typing import Any

import pytest

from shmbroker import shared_memory
from tests.support.shm_daemon import shm_daemon  # noqa: F401 (the fixture the classes use)


class _TestSharedMemory(unittest.TestCase):
    # ADAPTED (harness): CPython's BaseTestCase runs this class once per start
    # method; the subclass at the end of this file gives ``Process``.
    Process: Any = None
    __test__ = False

    @staticmethod
    def _attach_existing_shmem_then_write(
        shmem_name_or_obj: str | shared_memory.SharedMemory, binary_data: bytes
    ) -> None:
        if isinstance(shmem_name_or_obj, str):
            local_sms = shared_memory.SharedMemory(shmem_name_or_obj)
        else:
            local_sms = shmem_name_or_obj
        local_sms.buf[: len(binary_data)] = binary_data
        local_sms.close()

    def _new_shm_name(self, prefix: str) -> str:
        # Add a PID to the name of a POSIX shared memory object to allow
        # running multiprocessing tests (test_multiprocessing_fork,
        # test_multiprocessing_spawn, etc) in parallel.
        return prefix + str(os.getpid())

    def test_shared_memory_basics(self) -> None:
        name_tsmb = self._new_shm_name("test01_tsmb")
        sms = shared_memory.SharedMemory(name_tsmb, create=True, size=512)
        self.addCleanup(sms.unlink)

        # Verify attributes are readable.
        self.assertEqual(sms.name, name_tsmb)
        self.assertGreaterEqual(sms.size, 512)
        self.assertGreaterEqual(len(sms.buf), sms.size)

        # Verify __repr__
        self.assertIn(sms.name, str(sms))
        self.assertIn(str(sms.size), str(sms))

        # Modify contents of shared memory segment through memoryview.
        sms.buf[0] = 42
        self.assertEqual(sms.buf[0], 42)

        # Attach to existing shared memory segment.
        also_sms = shared_memory.SharedMemory(name_tsmb)
        self.assertEqual(also_sms.buf[0], 42)
        also_sms.close()

        # Attach to existing shared memory segment but specify a new size.
        same_sms = shared_memory.SharedMemory(name_tsmb, size=20 * sms.size)
        self.assertLess(same_sms.size, 20 * sms.size)  # Size was ignored.
        same_sms.close()

        # Creating Shared Memory Segment with -ve size
        with self.assertRaises(ValueError):
            shared_memory.SharedMemory(create=True, size=-2)

        # Attaching Shared Memory Segment without a name
        with self.assertRaises(ValueError):
            shared_memory.SharedMemory(create=False)

        # Test if shared memory segment is created properly,
        # when _make_filename returns an existing shared memory segment name
        with unittest.mock.patch("shmbroker.shared_memory._make_filename") as mock_make_filename:
            NAME_PREFIX = shared_memory._SHM_NAME_PREFIX
            names = [self._new_shm_name("test01_fn"), self._new_shm_name("test02_fn")]
            # Prepend NAME_PREFIX which can be '/psm_' or 'wnsm_', necessary
            # because some POSIX compliant systems require name to start with /
            names = [NAME_PREFIX + name for name in names]

            mock_make_filename.side_effect = names
            shm1 = shared_memory.SharedMemory(create=True, size=1)
            self.addCleanup(shm1.unlink)
            self.assertEqual(shm1._name, names[0])

            mock_make_filename.side_effect = names
            shm2 = shared_memory.SharedMemory(create=True, size=1)
            self.addCleanup(shm2.unlink)
            self.assertEqual(shm2._name, names[1])

        if shared_memory._USE_POSIX:
            # Posix Shared Memory can only be unlinked once.  Here we
            # test an implementation detail that is not observed across
            # all supported platforms (since WindowsNamedSharedMemory
            # manages unlinking on its own and unlink() does nothing).
            # True release of shared memory segment does not necessarily
            # happen until process exits, depending on the OS platform.
            name_dblunlink = self._new_shm_name("test01_dblunlink")
            sms_uno = shared_memory.SharedMemory(name_dblunlink, create=True, size=5000)
            with self.assertRaises(FileNotFoundError):
                try:
                    self.assertGreaterEqual(sms_uno.size, 5000)

                    sms_duo = shared_memory.SharedMemory(name_dblunlink)
                    sms_duo.unlink()  # First shm_unlink() call.
                    sms_duo.close()
                    sms_uno.close()

                finally:
                    sms_uno.unlink()  # A second shm_unlink() call is bad.

        with self.assertRaises(FileExistsError):
            # Attempting to create a new shared memory segment with a
            # name that is already in use triggers an exception.
            there_can_only_be_one_sms = shared_memory.SharedMemory(name_tsmb, create=True, size=512)

        if shared_memory._USE_POSIX:
            # Requesting creation of a shared memory segment with the option
            # to attach to an existing segment, if that name is currently in
            # use, should not trigger an exception.
            # Note:  Using a smaller size could possibly cause truncation of
            # the existing segment but is OS platform dependent.  In the
            # case of MacOS/darwin, requesting a smaller size is disallowed.
            class OptionalAttachSharedMemory(shared_memory.SharedMemory):
                _flags = os.O_CREAT | os.O_RDWR

            ok_if_exists_sms = OptionalAttachSharedMemory(name_tsmb)
            self.assertEqual(ok_if_exists_sms.size, sms.size)
            ok_if_exists_sms.close()

        # Attempting to attach to an existing shared memory segment when
        # no segment exists with the supplied name triggers an exception.
        with self.assertRaises(FileNotFoundError):
            nonexisting_sms = shared_memory.SharedMemory("test01_notthere")
            nonexisting_sms.unlink()  # Error should occur on prior line.

        sms.close()

    def test_shared_memory_recreate(self) -> None:
        # Test if shared memory segment is created properly,
        # when _make_filename returns an existing shared memory segment name
        with unittest.mock.patch("shmbroker.shared_memory._make_filename") as mock_make_filename:
            NAME_PREFIX = shared_memory._SHM_NAME_PREFIX
            names = [self._new_shm_name("test03_fn"), self._new_shm_name("test04_fn")]
            # Prepend NAME_PREFIX which can be '/psm_' or 'wnsm_', necessary
            # because some POSIX compliant systems require name to start with /
            names = [NAME_PREFIX + name for name in names]

            mock_make_filename.side_effect = names
            shm1 = shared_memory.SharedMemory(create=True, size=1)
            self.addCleanup(shm1.unlink)
            self.assertEqual(shm1._name, names[0])

            mock_make_filename.side_effect = names
            shm2 = shared_memory.SharedMemory(create=True, size=1)
            self.addCleanup(shm2.unlink)
            self.assertEqual(shm2._name, names[1])

    def test_invalid_shared_memory_cration(self) -> None:
        # Test creating a shared memory segment with negative size
        with self.assertRaises(ValueError):
            sms_invalid = shared_memory.SharedMemory(create=True, size=-1)

        # Test creating a shared memory segment with size 0
        with self.assertRaises(ValueError):
            sms_invalid = shared_memory.SharedMemory(create=True, size=0)

        # Test creating a shared memory segment without size argument
        with self.assertRaises(ValueError):
            sms_invalid = shared_memory.SharedMemory(create=True)

    def test_shared_memory_pickle_unpickle(self) -> None:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            with self.subTest(proto=proto):
                sms = shared_memory.SharedMemory(create=True, size=512)
                self.addCleanup(sms.unlink)
                sms.buf[0:6] = b"pickle"

                # Test pickling
                pickled_sms = pickle.dumps(sms, protocol=proto)

                # Test unpickling
                sms2 = pickle.loads(pickled_sms)
                self.assertIsInstance(sms2, shared_memory.SharedMemory)
                self.assertEqual(sms.name, sms2.name)
                self.assertEqual(bytes(sms.buf[0:6]), b"pickle")
                self.assertEqual(bytes(sms2.buf[0:6]), b"pickle")

                # Test that unpickled version is still the same SharedMemory
                sms.buf[0:6] = b"newval"
                self.assertEqual(bytes(sms.buf[0:6]), b"newval")
                self.assertEqual(bytes(sms2.buf[0:6]), b"newval")

                sms2.buf[0:6] = b"oldval"
                self.assertEqual(bytes(sms.buf[0:6]), b"oldval")
                self.assertEqual(bytes(sms2.buf[0:6]), b"oldval")

    def test_shared_memory_pickle_unpickle_dead_object(self) -> None:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            with self.subTest(proto=proto):
                sms = shared_memory.SharedMemory(create=True, size=512)
                sms.buf[0:6] = b"pickle"
                pickled_sms = pickle.dumps(sms, protocol=proto)

                # Now, we are going to kill the original object.
                # So, unpickled one won't be able to attach to it.
                sms.close()
                sms.unlink()

                with self.assertRaises(FileNotFoundError):
                    pickle.loads(pickled_sms)

    def test_shared_memory_across_processes(self) -> None:
        # bpo-40135: don't define shared memory block's name in case of
        # the failure when we run multiprocessing tests in parallel.
        sms = shared_memory.SharedMemory(create=True, size=512)
        self.addCleanup(sms.unlink)

        # Verify remote attachment to existing block by name is working.
        p = self.Process(target=self._attach_existing_shmem_then_write, args=(sms.name, b"howdy"))
        p.daemon = True
        p.start()
        p.join()
        self.assertEqual(bytes(sms.buf[:5]), b"howdy")

        # Verify pickling of SharedMemory instance also works.
        p = self.Process(target=self._attach_existing_shmem_then_write, args=(sms, b"HELLO"))
        p.daemon = True
        p.start()
        p.join()
        self.assertEqual(bytes(sms.buf[:5]), b"HELLO")

        sms.close()

    @unittest.skipIf(os.name != "posix", "not feasible in non-posix platforms")
    def test_shared_memory_SharedMemoryServer_ignores_sigint(self) -> None:
        # bpo-36368: protect SharedMemoryManager server process from
        # KeyboardInterrupt signals.
        smm = shared_memory.SharedMemoryManager()
        smm.start()

        # make sure the manager works properly at the beginning
        sl = smm.ShareableList(range(10))

        # the manager's server should ignore KeyboardInterrupt signals, and
        # maintain its connection with the current process, and success when
        # asked to deliver memory segments.
        # ADAPTED (tracker-specific): there is no server process to send SIGINT
        # to (smm._process); the daemon is the server.

        sl2 = smm.ShareableList(range(10))

        # test that the custom signal handler registered in the Manager does
        # not affect signal handling in the parent process.
        # ADAPTED: a test run started in the background of a shell without job
        # control inherits SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler; give this process Python's default for the
        # check (the manager must not have replaced it either way).
        self.assertIn(signal.getsignal(signal.SIGINT), (signal.default_int_handler, signal.SIG_IGN))
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with self.assertRaises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            signal.signal(signal.SIGINT, previous)

        smm.shutdown()

    @unittest.skipIf(os.name != "posix", "resource_tracker is posix only")
    def test_shared_memory_SharedMemoryManager_reuses_resource_tracker(self) -> None:
        # bpo-36867: test that a SharedMemoryManager uses the
        # same resource_tracker process as its parent.
        cmd = """if 1:
            from shmbroker.shared_memory import SharedMemoryManager


            smm = SharedMemoryManager()
            smm.start()
            sl = smm.ShareableList(range(10))
            smm.shutdown()
        """
        # ADAPTED (harness): subprocess instead of test.support.script_helper
        # (Debian ships it in a package the suite must not need).
        proc = subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        err = proc.stderr

        # Before bpo-36867 was fixed, a SharedMemoryManager not using the same
        # resource_tracker process as its parent would make the parent's
        # tracker complain about sl being leaked even though smm.shutdown()
        # properly released sl.
        self.assertFalse(err)

    def test_shared_memory_SharedMemoryManager_basics(self) -> None:
        smm1 = shared_memory.SharedMemoryManager()
        with self.assertRaises(ValueError):
            smm1.SharedMemory(size=9)  # Fails if SharedMemoryServer not started
        smm1.start()
        lol = [smm1.ShareableList(range(i)) for i in range(5, 10)]
        lom = [smm1.SharedMemory(size=j) for j in range(32, 128, 16)]
        doppleganger_list0 = shared_memory.ShareableList(name=lol[0].shm.name)
        self.assertEqual(len(doppleganger_list0), 5)
        doppleganger_shm0 = shared_memory.SharedMemory(name=lom[0].name)
        self.assertGreaterEqual(len(doppleganger_shm0.buf), 32)
        held_name = lom[0].name
        smm1.shutdown()
        if sys.platform != "win32":
            # Calls to unlink() have no effect on Windows platform; shared
            # memory will only be released once final process exits.
            with self.assertRaises(FileNotFoundError):
                # No longer there to be attached to again.
                absent_shm = shared_memory.SharedMemory(name=held_name)

        with shared_memory.SharedMemoryManager() as smm2:
            sl = smm2.ShareableList("howdy")
            shm = smm2.SharedMemory(size=128)
            held_name = sl.shm.name
        if sys.platform != "win32":
            with self.assertRaises(FileNotFoundError):
                # No longer there to be attached to again.
                absent_sl = shared_memory.ShareableList(name=held_name)

    def test_shared_memory_ShareableList_basics(self) -> None:
        sl = shared_memory.ShareableList(["howdy", b"HoWdY", -273.154, 100, None, True, 42])
        self.addCleanup(sl.shm.unlink)

        # Verify __repr__
        self.assertIn(sl.shm.name, str(sl))
        self.assertIn(str(list(sl)), str(sl))

        # Index Out of Range (get)
        with self.assertRaises(IndexError):
            sl[7]

        # Index Out of Range (set)
        with self.assertRaises(IndexError):
            sl[7] = 2

        # Assign value without format change (str -> str)
        current_format = sl._get_packing_format(0)
        sl[0] = "howdy"
        self.assertEqual(current_format, sl._get_packing_format(0))

        # Verify attributes are readable.
        self.assertEqual(sl.format, "8s8sdqxxxxxx?xxxxxxxx?q")

        # Exercise len().
        self.assertEqual(len(sl), 7)

        # Exercise index().
        with warnings.catch_warnings():
            # Suppress BytesWarning when comparing against b'HoWdY'.
            warnings.simplefilter("ignore")
            with self.assertRaises(ValueError):
                sl.index("100")
            self.assertEqual(sl.index(100), 3)

        # Exercise retrieving individual values.
        self.assertEqual(sl[0], "howdy")
        self.assertEqual(sl[-2], True)

        # Exercise iterability.
        self.assertEqual(tuple(sl), ("howdy", b"HoWdY", -273.154, 100, None, True, 42))

        # Exercise modifying individual values.
        sl[3] = 42
        self.assertEqual(sl[3], 42)
        sl[4] = "some"  # Change type at a given position.
        self.assertEqual(sl[4], "some")
        self.assertEqual(sl.format, "8s8sdq8sxxxxxxx?q")
        with self.assertRaisesRegex(ValueError, "exceeds available storage"):
            sl[4] = "far too many"
        self.assertEqual(sl[4], "some")
        sl[0] = "encodés"  # Exactly 8 bytes of UTF-8 data
        self.assertEqual(sl[0], "encodés")
        self.assertEqual(sl[1], b"HoWdY")  # no spillage
        with self.assertRaisesRegex(ValueError, "exceeds available storage"):
            sl[0] = "encodées"  # Exactly 9 bytes of UTF-8 data
        self.assertEqual(sl[1], b"HoWdY")
        with self.assertRaisesRegex(ValueError, "exceeds available storage"):
            sl[1] = b"123456789"
        self.assertEqual(sl[1], b"HoWdY")

        # Exercise count().
        with warnings.catch_warnings():
            # Suppress BytesWarning when comparing against b'HoWdY'.
            warnings.simplefilter("ignore")
            self.assertEqual(sl.count(42), 2)
            self.assertEqual(sl.count(b"HoWdY"), 1)
            self.assertEqual(sl.count(b"adios"), 0)

        # Exercise creating a duplicate.
        name_duplicate = self._new_shm_name("test03_duplicate")
        sl_copy = shared_memory.ShareableList(sl, name=name_duplicate)
        try:
            self.assertNotEqual(sl.shm.name, sl_copy.shm.name)
            self.assertEqual(name_duplicate, sl_copy.shm.name)
            self.assertEqual(list(sl), list(sl_copy))
            self.assertEqual(sl.format, sl_copy.format)
            sl_copy[-1] = 77
            self.assertEqual(sl_copy[-1], 77)
            self.assertNotEqual(sl[-1], 77)
            sl_copy.shm.close()
        finally:
            sl_copy.shm.unlink()

        # Obtain a second handle on the same ShareableList.
        sl_tethered = shared_memory.ShareableList(name=sl.shm.name)
        self.assertEqual(sl.shm.name, sl_tethered.shm.name)
        sl_tethered[-1] = 880
        self.assertEqual(sl[-1], 880)
        sl_tethered.shm.close()

        sl.shm.close()

        # Exercise creating an empty ShareableList.
        empty_sl = shared_memory.ShareableList()
        try:
            self.assertEqual(len(empty_sl), 0)
            self.assertEqual(empty_sl.format, "")
            self.assertEqual(empty_sl.count("any"), 0)
            with self.assertRaises(ValueError):
                empty_sl.index(None)
            empty_sl.shm.close()
        finally:
            empty_sl.shm.unlink()

    def test_shared_memory_ShareableList_pickling(self) -> None:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            with self.subTest(proto=proto):
                sl = shared_memory.ShareableList(range(10))
                self.addCleanup(sl.shm.unlink)

                serialized_sl = pickle.dumps(sl, protocol=proto)
                deserialized_sl = pickle.loads(serialized_sl)
                self.assertIsInstance(deserialized_sl, shared_memory.ShareableList)
                self.assertEqual(deserialized_sl[-1], 9)
                self.assertIsNot(sl, deserialized_sl)

                deserialized_sl[4] = "changed"
                self.assertEqual(sl[4], "changed")
                sl[3] = "newvalue"
                self.assertEqual(deserialized_sl[3], "newvalue")

                larger_sl = shared_memory.ShareableList(range(400))
                self.addCleanup(larger_sl.shm.unlink)
                serialized_larger_sl = pickle.dumps(larger_sl, protocol=proto)
                self.assertEqual(len(serialized_sl), len(serialized_larger_sl))
                larger_sl.shm.close()

                deserialized_sl.shm.close()
                sl.shm.close()

    def test_shared_memory_ShareableList_pickling_dead_object(self) -> None:
        for proto in range(pickle.HIGHEST_PROTOCOL + 1):
            with self.subTest(proto=proto):
                sl = shared_memory.ShareableList(range(10))
                serialized_sl = pickle.dumps(sl, protocol=proto)

                # Now, we are going to kill the original object.
                # So, unpickled one won't be able to attach to it.
                sl.shm.close()
                sl.shm.unlink()

                with self.assertRaises(FileNotFoundError):
                    pickle.loads(serialized_sl)

    def test_shared_memory_cleaned_after_process_termination(self) -> None:
        # INVERTED (tracker-specific): CPython's resource tracker unlinks the
        # segment of a terminated creator and warns about a "leak".  Here the
        # segment outlives its creator until unlink(), and nothing is printed.
        cmd = """if 1:
            import os, time, sys
            from shmbroker import shared_memory

            # Create a shared_memory segment, and send the segment name
            sm = shared_memory.SharedMemory(create=True, size=10)
            sm.buf[:4] = b'kept'
            sys.stdout.write(sm.name + '\\n')
            sys.stdout.flush()
            time.sleep(100)
        """
        with subprocess.Popen(
            [sys.executable, "-E", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as p:
            name = p.stdout.readline().strip().decode()

            # killing abruptly processes holding reference to a shared memory
            # segment leaves the segment: it lives until unlink().
            p.terminate()
            p.wait()

            smm = shared_memory.SharedMemory(name, create=False)
            try:
                self.assertEqual(bytes(smm.buf[:4]), b"kept")
            finally:
                smm.close()
                smm.unlink()

            err = p.stderr.read().decode()
            self.assertNotIn("leaked", err)
            self.assertEqual(err, "")


@pytest.mark.usefixtures("shm_daemon")
class TestSharedMemoryFork(_TestSharedMemory):
    __test__ = True
    Process = multiprocessing.get_context("fork").Process

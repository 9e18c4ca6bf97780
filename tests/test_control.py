"""The simulator's control file: atomic updates that keep other keys, and the start barrier."""

from __future__ import annotations

import threading
import time

from p2pcod.control import read_control, wait_while_held, write_control


def test_write_control_merges_and_reads_back(tmp_path):
    path = tmp_path / "control.json"
    assert read_control(path) == {}
    write_control(path, hold=True)
    write_control(path, cut_off_until=12.5)
    assert read_control(path) == {"hold": True, "cut_off_until": 12.5}
    path.write_text("{not json")
    assert read_control(path) == {}  # unreadable: treated as empty (and logged), never an exception
    path.write_text("[1, 2]")
    assert read_control(path) == {}


def test_barrier_holds_until_released_or_stopped(tmp_path):
    path = tmp_path / "control.json"
    stop = threading.Event()
    assert wait_while_held(None, stop) and wait_while_held(path, stop)  # no file: no barrier
    write_control(path, hold=True)
    released: list[float] = []
    waiter = threading.Thread(target=lambda: released.append(wait_while_held(path, stop, poll_s=0.01) and time.time()))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and released == []  # held
    t_release = time.time()
    write_control(path, hold=False)
    waiter.join(5)
    assert not waiter.is_alive() and released and released[0] >= t_release
    write_control(path, hold=True)
    stopper = threading.Timer(0.2, stop.set)
    stopper.start()
    assert wait_while_held(path, stop, poll_s=0.01) is False  # a stop ends the wait, reported as False

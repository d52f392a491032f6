"""A CPU-bound request handler with a 50/30/20 split of its time between three
functions, a thread sleeping in a Python function, and a 40-deep recursive chain.

python3 service.py SECONDS [cpu|recursive]
"""
import sys
import threading
import time


def spin(units):
    # The recursion's leaf. The handler's three functions each loop on their own rather
    # than call this, so each one's CPU is its own self time, as py-spy counts it.
    total = 0
    for i in range(units):
        total += i * i
    return total


def parse_request(units):
    total = 0
    for i in range(units * 5):
        total += i * i
    return total


def render_page(units):
    total = 0
    for i in range(units * 3):
        total += i * i
    return total


def checksum(units):
    total = 0
    for i in range(units * 2):
        total += i * i
    return total


def handle_request():
    parse_request(1000)
    render_page(1000)
    checksum(1000)


def recurse(depth):
    if depth == 0:
        return spin(20000)
    return recurse(depth - 1)


def sleeper(stop):
    while not stop.is_set():
        nap()


def nap():
    time.sleep(0.02)


def main():
    seconds = float(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    stop = threading.Event()
    thread = threading.Thread(target=sleeper, args=(stop,), name="sleeper")
    thread.start()
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if mode == "recursive":
            recurse(39)
        else:
            handle_request()
    stop.set()
    thread.join()


if __name__ == "__main__":
    main()

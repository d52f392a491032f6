# Run by the Python layout tests: prints what the interpreter knows of its own frames and
# code objects, then blocks in target() until stdin closes.
import dis
import json
import sys
import threading


def lines(c):
    """(start, end, line) of each range of bytecode offsets: co_lines() from 3.10,
    from the line starts before."""
    if hasattr(c, "co_lines"):
        return [[s, e, l] for s, e, l in c.co_lines() if l is not None]
    starts = list(dis.findlinestarts(c))
    ends = [s for s, _ in starts[1:]] + [len(c.co_code)]
    return [[s, e, l] for (s, l), e in zip(starts, ends)]


def target(a, b=2):
    x = a + b
    return sys.stdin.readline() + str(x)


class Handler:
    def method(self):
        return target(1)


def héllo():
    return 1


def 名前():
    return 2


module_code = sys._getframe().f_code
# The lines each frame will be at, blocked: target()'s return, method()'s call, and the
# module's last line.
last_line = len(open(__file__, encoding="utf-8").read().rstrip("\n").split("\n"))
codes = [target.__code__, Handler.method.__code__, héllo.__code__, 名前.__code__, module_code]
print(json.dumps({
    "tid": threading.get_native_id(),
    "ident": threading.get_ident(),
    "version": list(sys.version_info[:2]),
    "stack": [id(target.__code__), id(Handler.method.__code__), id(module_code)],
    "stack_lines": [target.__code__.co_firstlineno + 2, Handler.method.__code__.co_firstlineno + 1, last_line],
    "codes": [
        {
            "addr": id(c),
            "qualname": getattr(c, "co_qualname", c.co_name),
            "filename": c.co_filename,
            "first_line": c.co_firstlineno,
            "lines": lines(c),
        }
        for c in codes
    ],
}), flush=True)
Handler().method()

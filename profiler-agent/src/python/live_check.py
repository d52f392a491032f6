# Run by the Python layout tests: prints what the interpreter knows of its own frames and
# code objects, then blocks in target() until stdin closes.
import json
import sys
import threading


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
codes = [target.__code__, Handler.method.__code__, héllo.__code__, 名前.__code__, module_code]
print(json.dumps({
    "tid": threading.get_native_id(),
    "version": list(sys.version_info[:2]),
    "stack": [id(target.__code__), id(Handler.method.__code__), id(module_code)],
    "codes": [
        {
            "addr": id(c),
            "qualname": c.co_qualname,
            "filename": c.co_filename,
            "first_line": c.co_firstlineno,
            "lines": [[s, e, l] for s, e, l in c.co_lines() if l is not None],
        }
        for c in codes
    ],
}), flush=True)
Handler().method()

/* Prints the offsets `layout.rs` holds for a CPython, from its own headers: the layout
 * tests compile this against each installed CPython's headers and compare. */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#define P(name, expr) printf("%-32s %zu\n", name, (size_t)(expr))
#if PY_VERSION_HEX < 0x030B0000
/* 3.8 to 3.10: frames are objects (`PyFrameObject`); printed under the names of the
 * fields that play their part in later versions. */
#include <frameobject.h>
#include "internal/pycore_pystate.h"
#if PY_VERSION_HEX >= 0x03090000
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#endif
int main(void) {
  P("runtime.interpreters.head", offsetof(_PyRuntimeState, interpreters.head));
  P("interp.threads.head", offsetof(PyInterpreterState, tstate_head));
  P("tstate.next", offsetof(PyThreadState, next));
  P("tstate.native_thread_id", offsetof(PyThreadState, thread_id));
  P("tstate.frame", offsetof(PyThreadState, frame));
  P("sizeof tstate", sizeof(PyThreadState));
  P("frame.f_code", offsetof(PyFrameObject, f_code));
  P("frame.previous", offsetof(PyFrameObject, f_back));
  P("frame.f_globals", offsetof(PyFrameObject, f_globals));
  P("frame.f_lasti", offsetof(PyFrameObject, f_lasti));
  P("code.ob_type", offsetof(PyCodeObject, ob_base.ob_type));
  P("code.co_argcount", offsetof(PyCodeObject, co_argcount));
  P("code.co_firstlineno", offsetof(PyCodeObject, co_firstlineno));
  P("code.co_code", offsetof(PyCodeObject, co_code));
  P("code.co_filename", offsetof(PyCodeObject, co_filename));
  P("code.co_qualname", offsetof(PyCodeObject, co_name));
#if PY_VERSION_HEX >= 0x030A0000
  P("code.co_linetable", offsetof(PyCodeObject, co_linetable));
#else
  P("code.co_linetable", offsetof(PyCodeObject, co_lnotab));
#endif
  P("sizeof code", sizeof(PyCodeObject));
#else
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_frame.h"
#include "internal/pycore_code.h"
int main(void) {
  P("runtime.interpreters.head", offsetof(_PyRuntimeState, interpreters.head));
  P("interp.threads.head", offsetof(PyInterpreterState, threads.head));
  P("tstate.next", offsetof(PyThreadState, next));
  P("tstate.native_thread_id", offsetof(PyThreadState, native_thread_id));
#if PY_VERSION_HEX >= 0x030D0000
  P("tstate.current_frame", offsetof(PyThreadState, current_frame));
#else
  P("tstate.cframe", offsetof(PyThreadState, cframe));
  P("cframe.current_frame", offsetof(_PyCFrame, current_frame));
#endif
  P("tstate.datastack_chunk", offsetof(PyThreadState, datastack_chunk));
  P("tstate.datastack_top", offsetof(PyThreadState, datastack_top));
  P("chunk.data", offsetof(_PyStackChunk, data));
  P("sizeof tstate", sizeof(PyThreadState));
#if PY_VERSION_HEX >= 0x030D0000
  P("frame.f_executable", offsetof(_PyInterpreterFrame, f_executable));
  P("frame.instr_ptr", offsetof(_PyInterpreterFrame, instr_ptr));
#else
  P("frame.f_code", offsetof(_PyInterpreterFrame, f_code));
  P("frame.prev_instr", offsetof(_PyInterpreterFrame, prev_instr));
#endif
  P("frame.previous", offsetof(_PyInterpreterFrame, previous));
#if PY_VERSION_HEX >= 0x030C0000
  P("frame.f_funcobj", offsetof(_PyInterpreterFrame, f_funcobj));
  P("frame.owner", offsetof(_PyInterpreterFrame, owner));
#if PY_VERSION_HEX >= 0x030E0000
  /* 3.14's entry frames, and the C stack's after them. */
  P("first shim owner", FRAME_OWNED_BY_INTERPRETER);
#else
  P("first shim owner", FRAME_OWNED_BY_CSTACK);
#endif
#endif
  P("code.ob_type", offsetof(PyCodeObject, ob_base.ob_base.ob_type));
  P("code.co_flags", offsetof(PyCodeObject, co_flags));
  P("code.co_argcount", offsetof(PyCodeObject, co_argcount));
  P("code.co_posonlyargcount", offsetof(PyCodeObject, co_posonlyargcount));
  P("code.co_kwonlyargcount", offsetof(PyCodeObject, co_kwonlyargcount));
  P("code.co_stacksize", offsetof(PyCodeObject, co_stacksize));
  P("code.co_firstlineno", offsetof(PyCodeObject, co_firstlineno));
  P("code.co_nlocalsplus", offsetof(PyCodeObject, co_nlocalsplus));
  P("code.co_nlocals", offsetof(PyCodeObject, co_nlocals));
  P("code.co_filename", offsetof(PyCodeObject, co_filename));
  P("code.co_name", offsetof(PyCodeObject, co_name));
  P("code.co_qualname", offsetof(PyCodeObject, co_qualname));
  P("code.co_linetable", offsetof(PyCodeObject, co_linetable));
  P("code.co_code_adaptive", offsetof(PyCodeObject, co_code_adaptive));
#endif
  P("str.length", offsetof(PyASCIIObject, length));
  P("str.state", offsetof(PyASCIIObject, state));
  P("sizeof PyASCIIObject", sizeof(PyASCIIObject));
  P("sizeof PyCompactUnicodeObject", sizeof(PyCompactUnicodeObject));
  P("bytes.ob_size", offsetof(PyBytesObject, ob_base.ob_size));
  P("bytes.ob_sval", offsetof(PyBytesObject, ob_sval));
  return 0;
}

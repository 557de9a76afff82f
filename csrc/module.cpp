// Lets `import zo_opt._C` load the ahead-of-time build; importing it registers the ops.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "zo_opt kernels (torch.ops.zo_opt)", -1, nullptr};
  return PyModule_Create(&module);
}

// Python module stub: `import strive_kernels._C` loads this library, whose static initialisers
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) register the strive:: ops with the dispatcher. No pybind needed.
#include <Python.h>

static struct PyModuleDef strive_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "strive_kernels native ops", -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&strive_c_module); }

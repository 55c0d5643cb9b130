// The Python module of the C++ kernel: the steps of steps.h, bound with pybind11. The only
// translation unit that includes torch/extension.h (about 25 s of the build's compile time,
// spent here once while the steps compile beside it).

#include <torch/extension.h>

#include "steps.h"

// Python bindings (pybind11 converts a list of 1000 tensors several times faster than the
// dispatcher's boxed calls through torch.ops, which matters for models of many small
// tensors). The GIL is released while the threads work.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_step_", &decoupled_kernels::adam_step_, py::call_guard<py::gil_scoped_release>());
  m.def("adam_compensated_step_", &decoupled_kernels::adam_compensated_step_,
        py::call_guard<py::gil_scoped_release>());
  m.def("sgd_step_", &decoupled_kernels::sgd_step_, py::call_guard<py::gil_scoped_release>());
  m.def("sgd_compensated_step_", &decoupled_kernels::sgd_compensated_step_,
        py::call_guard<py::gil_scoped_release>());
  m.def("adam_int8_step_", &decoupled_kernels::adam_int8_step_,
        py::call_guard<py::gil_scoped_release>());
}

// The only file that includes Python headers. Engine code lives in the other src_cpp files.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "checksum.hpp"

namespace py = pybind11;

namespace {

uint32_t py_crc32c(const py::buffer& data, uint32_t value) {
  py::buffer_info info = data.request();
  const auto nbytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  const void* ptr = info.ptr;
  py::gil_scoped_release nogil;
  return fastckpt::crc32c(value, ptr, nbytes);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastckpt's C++ core (private; use the typed wrappers in fastckpt)";
  m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("value") = 0,
        "CRC32C of a contiguous buffer, continuing from `value`. Releases the GIL.");
  m.def("crc32c_hardware", &fastckpt::crc32c_hardware);
}

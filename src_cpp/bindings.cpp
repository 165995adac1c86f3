// With bindings_copy.cpp, the only files that include Python headers. Engine code lives in the
// other src_cpp files.
//
// Ownership: a Batch holds the Py_buffer views of its destinations (which keep the exporting
// objects alive and, for bytearray/numpy, unresizable) and shared references to its files until
// no read of it can touch them any more. Every blocking call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "bindings.hpp"
#include "buffer.hpp"
#include "checksum.hpp"
#include "common.hpp"
#include "engine.hpp"
#include "file.hpp"
#include "pagecache.hpp"
#include "uring_backend.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using fastckpt::AlignedBuffer;
using fastckpt::BatchState;
using fastckpt::EngineCore;
using fastckpt::EngineOptions;
using fastckpt::FileHandle;

using fastckpt_py::finalizing;

// Paths arrive as str, bytes or os.PathLike; the OS wants bytes, messages want str.
struct PathArg {
  std::string native;
  std::string display;
};

PathArg path_arg(const py::object& path) {
  py::module_ os = py::module_::import("os");
  PathArg p;
  p.native = py::bytes(os.attr("fsencode")(path)).cast<std::string>();
  p.display = py::str(os.attr("fsdecode")(path)).cast<std::string>();
  if (p.native.find('\0') != std::string::npos)
    throw py::value_error("path contains a NUL byte: " + p.display);
  return p;
}

// ---------------------------------------------------------------------------------- buffers

// One acquired Py_buffer, released with the GIL held.
class View {
 public:
  View() = default;
  View(const View&) = delete;
  View& operator=(const View&) = delete;
  ~View() { release(); }
  Py_buffer* get() { return &buf_; }
  void mark_acquired() { acquired_ = true; }
  void release() {
    if (acquired_) {
      PyBuffer_Release(&buf_);
      acquired_ = false;
    }
  }

 private:
  Py_buffer buf_{};
  bool acquired_ = false;
};

using Views = std::vector<std::unique_ptr<View>>;

void release_all(Views& views) {
  for (auto& v : views) v->release();
  views.clear();
}

// --------------------------------------------------------------------------------- File

struct PyFile {
  std::shared_ptr<FileHandle> handle;
  std::string path;
  uint64_t size = 0;
  bool direct = false;
  std::string direct_note;

  PyFile(const py::object& path_obj, bool want_direct, bool allow_special, int fd) {
    const PathArg p = path_arg(path_obj);
    {
      py::gil_scoped_release nogil;
      try {
        handle = fd >= 0 ? FileHandle::adopt(fd, p.display, want_direct)
                         : FileHandle::open(p.native, want_direct, allow_special);
      } catch (const fastckpt::IoError& e) {
        throw fastckpt::IoError(e.err(), e.what(), p.display);
      }
    }
    path = p.display;
    size = handle->size();
    direct = handle->direct();
    direct_note = handle->direct_note();
  }
  void close() { handle.reset(); }
};

// --------------------------------------------------------------------------------- Batch

struct PyBatch {
  std::shared_ptr<EngineCore> core;
  std::shared_ptr<BatchState> state;
  Views views;

  PyBatch(std::shared_ptr<EngineCore> c, std::shared_ptr<BatchState> s, Views v)
      : core(std::move(c)), state(std::move(s)), views(std::move(v)) {
    release_if_finished();
  }
  PyBatch(const PyBatch&) = delete;
  PyBatch& operator=(const PyBatch&) = delete;
  PyBatch(PyBatch&&) = default;

  ~PyBatch() {
    if (!state) return;
    if (!views.empty() || !state->finished()) {
      // Reads may still target the destinations: stop them before letting go of the buffers.
      if (finalizing()) {
        core->cancel(*state, "the batch was garbage-collected before it finished");
      } else {
        py::gil_scoped_release nogil;
        core->cancel(*state, "the batch was garbage-collected before it finished");
      }
    }
    release_all(views);
  }

  void release_if_finished() {
    if (!views.empty() && state->finished()) release_all(views);
  }

  py::list wait(int64_t min_completions, std::optional<double> timeout_s) {
    if (min_completions < 0)
      throw py::value_error("min_completions must be >= 0, got " +
                            std::to_string(min_completions));
    if (timeout_s && (std::isnan(*timeout_s) || *timeout_s < 0))
      throw py::value_error("timeout_s must be >= 0 or None");
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto slice_max = std::chrono::milliseconds(50);  // check for Ctrl-C this often
    std::chrono::nanoseconds budget = std::chrono::nanoseconds::max();
    if (timeout_s)
      budget = std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::duration<double>(std::min(*timeout_s, 1e9)));
    std::vector<int64_t> out;
    for (;;) {
      const auto elapsed = clock::now() - start;
      const auto left = budget - std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed);
      const auto slice = std::max(std::chrono::nanoseconds(0),
                                  std::min<std::chrono::nanoseconds>(left, slice_max));
      fastckpt::WaitStatus st;
      {
        py::gil_scoped_release nogil;
        st = state->wait(static_cast<size_t>(min_completions), slice, out);
        if (st == fastckpt::WaitStatus::kStopped)
          core->cancel(*state, "the batch was cancelled");
      }
      if (st == fastckpt::WaitStatus::kReady) {
        release_if_finished();
        py::list result(out.size());
        for (size_t i = 0; i < out.size(); ++i) result[i] = py::int_(out[i]);
        return result;
      }
      if (st == fastckpt::WaitStatus::kStopped) {
        release_all(views);
        state->throw_stopped();
      }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (timeout_s && clock::now() - start >= budget)
        throw fastckpt::WaitTimeout("timed out after " + std::to_string(*timeout_s) +
                                    " s waiting for " + std::to_string(min_completions) +
                                    " completion(s); " + std::to_string(state->pending()) +
                                    " request(s) pending");
    }
  }

  void cancel() {
    {
      py::gil_scoped_release nogil;
      core->cancel(*state, "the batch was cancelled");
    }
    release_all(views);
  }
};

// -------------------------------------------------------------------------------- Engine

struct PyEngine {
  std::shared_ptr<EngineCore> core;

  explicit PyEngine(const EngineOptions& opts) {
    py::gil_scoped_release nogil;
    core = std::make_shared<EngineCore>(opts);
  }
  PyEngine(const PyEngine&) = delete;
  PyEngine& operator=(const PyEngine&) = delete;
  ~PyEngine() {
    if (!core) return;
    if (finalizing()) {
      core->close();
    } else {
      py::gil_scoped_release nogil;
      core->close();
    }
  }

  void close() {
    py::gil_scoped_release nogil;
    core->close();
  }

  static int64_t as_int(const py::handle& h, size_t i, const char* field, bool non_negative) {
    return fastckpt_py::int_arg(h, "read " + std::to_string(i), field, non_negative);
  }

  PyBatch submit(const py::iterable& reads, bool check_file_size) {
    std::vector<fastckpt::ReadSpec> specs;
    Views views;
    std::unordered_map<PyObject*, size_t> view_of;
    try {
      size_t i = 0;
      for (py::handle item : reads) {
        if (!PyTuple_Check(item.ptr()) && !PyList_Check(item.ptr()))
          throw py::type_error("read " + std::to_string(i) +
                               ": expected a tuple (file, file_offset, nbytes, dest, "
                               "dest_offset, tag), got " +
                               std::string(Py_TYPE(item.ptr())->tp_name));
        const auto seq = py::reinterpret_borrow<py::sequence>(item);
        if (seq.size() != 6)
          throw py::value_error("read " + std::to_string(i) +
                                ": expected 6 items (file, file_offset, nbytes, dest, "
                                "dest_offset, tag), got " + std::to_string(seq.size()));
        fastckpt::ReadSpec s;
        s.file = fastckpt_py::file_handle_of(seq[0], "read " + std::to_string(i));
        s.offset = static_cast<uint64_t>(as_int(seq[1], i, "file_offset", true));
        s.nbytes = static_cast<uint64_t>(as_int(seq[2], i, "nbytes", true));
        s.dest_offset = static_cast<uint64_t>(as_int(seq[4], i, "dest_offset", true));
        s.tag = as_int(seq[5], i, "tag", false);
        const py::object dest = seq[3];
        auto it = view_of.find(dest.ptr());
        if (it == view_of.end()) {
          auto v = std::make_unique<View>();
          if (PyObject_GetBuffer(dest.ptr(), v->get(), PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
            const py::error_already_set why;
            throw py::type_error("read " + std::to_string(i) +
                                 ": the destination must be a writable C-contiguous buffer "
                                 "(AlignedBuffer, bytearray, numpy array...); " +
                                 std::string(Py_TYPE(dest.ptr())->tp_name) + ": " +
                                 std::string(py::str(why.value())));
          }
          v->mark_acquired();
          it = view_of.emplace(dest.ptr(), views.size()).first;
          views.push_back(std::move(v));
        }
        Py_buffer* b = views[it->second]->get();
        s.dest = static_cast<char*>(b->buf);
        s.dest_len = static_cast<uint64_t>(b->len);
        specs.push_back(std::move(s));
        ++i;
      }
      std::shared_ptr<BatchState> state;
      {
        py::gil_scoped_release nogil;
        state = core->submit(specs, check_file_size);
      }
      return PyBatch(core, std::move(state), std::move(views));
    } catch (...) {
      release_all(views);
      throw;
    }
  }

  py::dict info() const { return choice_dict(core->choice(), core->options()); }

  static py::dict choice_dict(const fastckpt::EngineChoice& c, const EngineOptions& o) {
    py::dict d;
    d["name"] = c.name;
    d["reason"] = c.reason;
    d["direct_reads"] = c.direct_backend;
    d["buffered_reads"] = c.buffered_backend;
    d["uring_compiled"] = c.uring_compiled;
    d["uring_usable"] = c.uring_usable;
    d["uring_error"] = c.uring_usable ? py::object(py::none()) : py::object(py::str(c.uring_error));
    d["liburing_version"] =
        c.uring_compiled ? py::object(py::str(c.liburing_version)) : py::object(py::none());
    d["queue_depth"] = o.queue_depth;
    d["threads"] = o.threads;
    d["chunk_bytes"] = o.chunk_bytes;
    return d;
  }
};

EngineOptions make_options(const std::string& kind, int64_t queue_depth, int64_t threads,
                           int64_t chunk_bytes, const std::string& buffered_route,
                           int64_t fault_after_bytes, int fault_errno) {
  EngineOptions o;
  if (kind == "auto")
    o.kind = fastckpt::EngineKind::kAuto;
  else if (kind == "uring" || kind == "io_uring")
    o.kind = fastckpt::EngineKind::kUring;
  else if (kind == "pread")
    o.kind = fastckpt::EngineKind::kPread;
  else
    throw py::value_error("engine kind " + kind + ": expected one of auto, uring, pread");
  if (buffered_route == "default")
    o.buffered_route = fastckpt::BufferedRoute::kDefault;
  else if (buffered_route == "uring")
    o.buffered_route = fastckpt::BufferedRoute::kUring;
  else if (buffered_route == "pread")
    o.buffered_route = fastckpt::BufferedRoute::kPread;
  else
    throw py::value_error("buffered_route " + buffered_route + ": expected default, uring, pread");
  fastckpt::check_engine_limits(queue_depth, threads, chunk_bytes);  // ValueError in Python
  o.queue_depth = static_cast<unsigned>(queue_depth);
  o.threads = static_cast<unsigned>(threads);
  o.chunk_bytes = static_cast<uint64_t>(chunk_bytes);
  o.fault_after_bytes = fault_after_bytes;
  o.fault_errno = fault_errno;
  return o;
}

// ------------------------------------------------------------------------------ crc32c

uint32_t py_crc32c_impl(const py::object& data, uint32_t value, bool software) {
  View v;
  if (PyObject_GetBuffer(data.ptr(), v.get(), PyBUF_C_CONTIGUOUS) != 0) {
    const py::error_already_set why;
    throw py::type_error("crc32c needs a C-contiguous buffer; " +
                         std::string(Py_TYPE(data.ptr())->tp_name) + ": " +
                         std::string(py::str(why.value())));
  }
  v.mark_acquired();
  const void* ptr = v.get()->buf;
  const auto nbytes = static_cast<size_t>(v.get()->len);
  py::gil_scoped_release nogil;
  return software ? fastckpt::crc32c_software(value, ptr, nbytes)
                  : fastckpt::crc32c(value, ptr, nbytes);
}

uint32_t py_crc32c(const py::object& data, uint32_t value) {
  return py_crc32c_impl(data, value, false);
}

fastckpt::ResidencyMethod residency_method(const std::string& m) {
  if (m == "auto") return fastckpt::ResidencyMethod::kAuto;
  if (m == "cachestat") return fastckpt::ResidencyMethod::kCachestat;
  if (m == "mincore") return fastckpt::ResidencyMethod::kMincore;
  throw py::value_error("method " + m + ": expected auto, cachestat or mincore");
}

template <class F>
auto with_display_path(const PathArg& p, F&& f) {
  try {
    return f();
  } catch (const fastckpt::IoError& e) {
    throw fastckpt::IoError(e.err(), e.what(), p.display);
  }
}

}  // namespace

namespace fastckpt_py {

bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

std::shared_ptr<FileHandle> file_handle_of(const py::handle& obj, const std::string& what) {
  if (!py::isinstance<PyFile>(obj))
    throw py::type_error(what + ": expected a fastckpt File, got " +
                         std::string(Py_TYPE(obj.ptr())->tp_name));
  auto& file = obj.cast<PyFile&>();
  if (!file.handle) throw py::value_error(what + ": file '" + file.path + "' is closed");
  return file.handle;
}

int64_t int_arg(const py::handle& h, const std::string& where, const char* field,
                bool non_negative) {
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr()))
    throw py::type_error(where + ": " + field + " must be an int, got " +
                         std::string(Py_TYPE(h.ptr())->tp_name));
  const int64_t v = py::cast<int64_t>(h);
  if (non_negative && v < 0)
    throw py::value_error(where + ": " + field + " must be >= 0, got " + std::to_string(v));
  return v;
}

std::shared_ptr<EngineCore> engine_core_of(const py::handle& obj) {
  if (!py::isinstance<PyEngine>(obj))
    throw py::type_error("expected a fastckpt Engine, got " +
                         std::string(Py_TYPE(obj.ptr())->tp_name));
  return obj.cast<PyEngine&>().core;
}

}  // namespace fastckpt_py

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastckpt's C++ core (private; use the typed wrappers in fastckpt.io_engine)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastckpt::IoError& e) {
      py::tuple args = e.path().empty() ? py::tuple(py::make_tuple(e.err(), e.what()))
                                        : py::tuple(py::make_tuple(e.err(), e.what(), e.path()));
      PyErr_SetObject(PyExc_OSError, args.ptr());
    } catch (const fastckpt::WaitTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const fastckpt::CancelledError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("crc32c", &py_crc32c, "data"_a, "value"_a = 0,
        "CRC32C of a contiguous buffer, continuing from `value`. Releases the GIL.");
  m.def("crc32c_hardware", &fastckpt::crc32c_hardware);
  m.def("crc32c_combine", &fastckpt::crc32c_combine, "crc_a"_a, "crc_b"_a, "len_b"_a,
        "CRC32C of A + B from crc(A), crc(B) and len(B).");
  m.def(
      "_crc32c_software",
      [](const py::object& data, uint32_t value) { return py_crc32c_impl(data, value, true); },
      "data"_a, "value"_a = 0, "The portable path, whatever the CPU (tests).");

  m.def(
      "residency",
      [](const py::object& path, const std::string& method, uint32_t sample_windows) {
        const PathArg p = path_arg(path);
        const auto meth = residency_method(method);
        py::gil_scoped_release nogil;
        return with_display_path(
            p, [&] { return fastckpt::residency(p.native, meth, sample_windows); });
      },
      "path"_a, "method"_a = "auto", "sample_windows"_a = 0);
  m.def(
      "residency_fd",
      [](int fd, const std::string& path, const std::string& method, uint32_t sample_windows) {
        const auto meth = residency_method(method);
        py::gil_scoped_release nogil;
        return fastckpt::residency_fd(fd, path, meth, sample_windows);
      },
      "fd"_a, "path"_a, "method"_a = "auto", "sample_windows"_a = 0,
      "residency() of an open descriptor (kept open); `path` is only for messages.");
  m.def("cachestat_available", [] { return fastckpt::cachestat_available(); });
  m.def(
      "drop_page_cache",
      [](const py::object& path) {
        const PathArg p = path_arg(path);
        py::gil_scoped_release nogil;
        with_display_path(p, [&] { fastckpt::drop_page_cache(p.native); });
      },
      "path"_a);

  m.attr("uring_compiled") = fastckpt::probe_uring().compiled;
  m.def("_set_uring_setup_fault", &fastckpt::set_uring_setup_fault, "err"_a,
        "Test hook: make io_uring setup fail with errno `err` (0 = off).");
  m.def(
      "engine_choice",
      [](const std::string& kind, int64_t queue_depth, int64_t threads, int64_t chunk_bytes,
         const std::string& buffered_route) {
        const EngineOptions o =
            make_options(kind, queue_depth, threads, chunk_bytes, buffered_route, -1, 0);
        return PyEngine::choice_dict(fastckpt::choose_engine(o), o);
      },
      "kind"_a, "queue_depth"_a, "threads"_a, "chunk_bytes"_a, "buffered_route"_a = "default");

  py::class_<AlignedBuffer>(m, "AlignedBuffer", py::buffer_protocol())
      .def(py::init([](int64_t nbytes, bool huge_pages) {
             if (nbytes < 0)
               throw py::value_error("nbytes must be >= 0, got " + std::to_string(nbytes));
             return new AlignedBuffer(static_cast<size_t>(nbytes), huge_pages);
           }),
           "nbytes"_a, py::kw_only(), "huge_pages"_a = true)
      .def_property_readonly("nbytes", &AlignedBuffer::size)
      .def_property_readonly("huge_pages", &AlignedBuffer::huge_pages)
      .def("__len__", &AlignedBuffer::size)
      .def_buffer([](AlignedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {py::ssize_t{1}}, false);
      });

  py::class_<PyFile>(m, "File")
      .def(py::init<const py::object&, bool, bool, int>(), "path"_a, py::kw_only(),
           "direct"_a = true, "_allow_special"_a = false, "fd"_a = -1)
      .def_readonly("path", &PyFile::path)
      .def_readonly("size", &PyFile::size)
      .def_readonly("direct", &PyFile::direct)
      .def_readonly("direct_note", &PyFile::direct_note)
      .def_property_readonly("closed", [](const PyFile& f) { return !f.handle; })
      .def("close", &PyFile::close);

  py::class_<PyBatch>(m, "Batch")
      .def("wait", &PyBatch::wait, "min_completions"_a = 1, "timeout_s"_a = py::none())
      .def("cancel", &PyBatch::cancel)
      .def_property_readonly("pending", [](const PyBatch& b) { return b.state->pending(); })
      .def_property_readonly("done", [](const PyBatch& b) { return b.state->done(); })
      .def("__len__", [](const PyBatch& b) { return b.state->size(); });

  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](const std::string& kind, int64_t queue_depth, int64_t threads,
                       int64_t chunk_bytes, const std::string& buffered_route,
                       int64_t fault_after_bytes, int fault_errno) {
             return new PyEngine(make_options(kind, queue_depth, threads, chunk_bytes,
                                              buffered_route, fault_after_bytes, fault_errno));
           }),
           "kind"_a, "queue_depth"_a, "threads"_a, "chunk_bytes"_a, py::kw_only(),
           "buffered_route"_a = "default", "_fault_after_bytes"_a = -1, "_fault_errno"_a = 5)
      .def_property_readonly("name", [](const PyEngine& e) { return e.core->choice().name; })
      .def_property_readonly("reason", [](const PyEngine& e) { return e.core->choice().reason; })
      .def_property_readonly("closed", [](const PyEngine& e) { return e.core->closed(); })
      .def_property_readonly("bytes_read", [](const PyEngine& e) { return e.core->bytes_read(); })
      .def_property_readonly("bytes_direct",
                             [](const PyEngine& e) { return e.core->bytes_direct(); })
      .def(
          "_set_paused", [](PyEngine& e, bool paused) { e.core->set_paused(paused); }, "paused"_a,
          "Test hook: hold queued reads until unpaused.")
      .def("info", &PyEngine::info)
      .def("submit", &PyEngine::submit, "reads"_a, py::kw_only(), "_check_file_size"_a = true)
      .def("close", &PyEngine::close);

  fastckpt_py::bind_copy(m);
}

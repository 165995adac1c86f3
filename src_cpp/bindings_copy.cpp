// Python bindings of the copy pipeline (src_cpp/copy/). Internal API for the loader: device
// addresses are plain ints here; fastckpt.io_engine wraps it and the public API never shows them.
//
// Ownership: every C++ object the pipeline touches (engine, files, gates, slot source, backend,
// cancel flag, pinned memory) is held by shared_ptr for the duration of a run, so a Python object
// dropped or closed meanwhile cannot free what a read or a copy still uses. The run releases the
// GIL throughout, taking it back only to check for Ctrl-C on the main thread.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "copy/copy_backend.hpp"
#include "copy/cuda_backend.hpp"
#include "copy/fake_backend.hpp"
#include "copy/pinned.hpp"
#include "copy/pipeline.hpp"
#include "copy/range_gate.hpp"
#include "copy/slot_source.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace fastckpt_py {
namespace {

using fastckpt::CancelFlag;
using fastckpt::CopyBackend;
using fastckpt::CopyOp;
using fastckpt::CudaCopyBackend;
using fastckpt::FakeCopyBackend;
using fastckpt::PinnedMemory;
using fastckpt::RangeGate;
using fastckpt::SlotSource;

// Seconds as a C++ duration; None (or a very long time) means no limit.
std::chrono::nanoseconds duration_arg(const std::optional<double>& s, const char* name) {
  if (!s) return std::chrono::nanoseconds::max();
  if (std::isnan(*s) || *s < 0)
    throw py::value_error(std::string(name) + " must be >= 0 or None, got " + std::to_string(*s));
  if (*s >= 1e9) return std::chrono::nanoseconds::max();
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(*s));
}

uint64_t addr_arg(const py::handle& h, const std::string& where, const char* field) {
  return static_cast<uint64_t>(int_arg(h, where, field, true));
}

std::vector<CopyOp> parse_ops(const py::iterable& ops) {
  std::vector<CopyOp> out;
  size_t i = 0;
  for (py::handle item : ops) {
    const std::string where = "op " + std::to_string(i);
    if (!PyTuple_Check(item.ptr()) && !PyList_Check(item.ptr()))
      throw py::type_error(where + ": expected a tuple, got " +
                           std::string(Py_TYPE(item.ptr())->tp_name));
    const auto seq = py::reinterpret_borrow<py::sequence>(item);
    const std::string kind = seq.size() > 0 && py::isinstance<py::str>(seq[0])
                                 ? seq[0].cast<std::string>()
                                 : std::string();
    CopyOp op;
    if (kind == "read") {
      if (seq.size() != 6)
        throw py::value_error(where + ": expected (\"read\", file, file_offset, nbytes, dst, "
                                      "gate or None), got " + std::to_string(seq.size()) +
                              " items");
      op.kind = CopyOp::Kind::kRead;
      op.file = file_handle_of(seq[1], where);
      op.offset = addr_arg(seq[2], where, "file_offset");
      op.nbytes = addr_arg(seq[3], where, "nbytes");
      op.dst = addr_arg(seq[4], where, "dst");
      const py::object gate = seq[5];
      if (!gate.is_none()) {
        if (!py::isinstance<RangeGate>(gate))
          throw py::type_error(where + ": the gate must be a RangeGate or None, got " +
                               std::string(Py_TYPE(gate.ptr())->tp_name));
        op.gate = gate.cast<std::shared_ptr<RangeGate>>();
      }
    } else if (kind == "host") {
      if (seq.size() != 4)
        throw py::value_error(where + ": expected (\"host\", src, nbytes, dst), got " +
                              std::to_string(seq.size()) + " items");
      op.kind = CopyOp::Kind::kHost;
      op.src = reinterpret_cast<const void*>(addr_arg(seq[1], where, "src"));
      op.nbytes = addr_arg(seq[2], where, "nbytes");
      op.dst = addr_arg(seq[3], where, "dst");
    } else {
      throw py::value_error(where + ": the first item must be \"read\" or \"host\"");
    }
    out.push_back(std::move(op));
    ++i;
  }
  return out;
}

py::dict result_dict(const fastckpt::PipelineResult& r) {
  py::dict d;
  d["crcs"] = r.crcs;
  d["copies"] = r.copies;
  d["max_copies_in_flight"] = r.max_copies_in_flight;
  d["max_reads_in_flight"] = r.max_reads_in_flight;
  d["bytes_staged"] = r.bytes_staged;
  d["bytes_host"] = r.bytes_host;
  d["read_wait_s"] = r.read_wait_s;
  d["copy_wait_s"] = r.copy_wait_s;
  d["gate_wait_s"] = r.gate_wait_s;
  d["slot_wait_s"] = r.slot_wait_s;
  d["drain_s"] = r.drain_s;
  d["total_s"] = r.total_s;
  d["slots_used"] = r.slots_used;
  d["slot_starved"] = r.slot_starved;
  return d;
}

bool on_main_thread() {
  py::module_ threading = py::module_::import("threading");
  const py::object main_ident = threading.attr("main_thread")().attr("ident");
  const py::object ident = threading.attr("get_ident")();
  return main_ident.equal(ident);
}

py::dict run_copy_pipeline(const py::object& engine, const py::iterable& ops_obj,
                           const std::shared_ptr<SlotSource>& slots,
                           const std::shared_ptr<CopyBackend>& backend, bool crc,
                           int64_t crc_threads, const std::shared_ptr<CancelFlag>& cancel,
                           int64_t max_slots,
                           int64_t host_window, std::optional<double> gate_timeout_s,
                           double copy_poll_s, double crc_delay_s) {
  if (!slots) throw py::type_error("slots must be a SlotSource");
  if (!backend) throw py::type_error("backend must be a CopyBackend");
  if (max_slots < 0) throw py::value_error("max_slots must be >= 0");
  if (crc_threads < 0 || crc_threads > 64)
    throw py::value_error("crc_threads must be between 0 and 64, got " +
                          std::to_string(crc_threads));
  if (host_window < 1) throw py::value_error("host_window must be >= 1");
  if (std::isnan(copy_poll_s) || copy_poll_s <= 0 || copy_poll_s > 1)
    throw py::value_error("copy_poll_s must be in (0, 1]");
  std::shared_ptr<fastckpt::EngineCore> core = engine_core_of(engine);
  const std::vector<CopyOp> ops = parse_ops(ops_obj);
  fastckpt::PipelineOptions opts;
  opts.crc = crc;
  opts.crc_threads = static_cast<size_t>(crc_threads);
  if (std::isnan(crc_delay_s) || crc_delay_s < 0 || crc_delay_s > 1)
    throw py::value_error("_crc_delay_s must be in [0, 1]");
  opts.crc_test_delay = std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(crc_delay_s));
  opts.max_slots = static_cast<size_t>(max_slots);
  opts.host_window = static_cast<size_t>(host_window);
  opts.gate_timeout = duration_arg(gate_timeout_s, "gate_timeout_s");
  opts.copy_poll = std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(copy_poll_s));
  // Ctrl-C: signals reach only the main thread, which checks them every ~50 ms with the GIL.
  std::optional<py::error_already_set> interrupt;
  if (on_main_thread()) {
    opts.interrupted = [&interrupt]() {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() == 0) return false;
      interrupt.emplace();  // takes the pending exception (KeyboardInterrupt...)
      return true;
    };
  }
  fastckpt::PipelineResult result;
  std::exception_ptr failure;
  {
    py::gil_scoped_release nogil;
    try {
      result = fastckpt::run_pipeline(*core, ops, *slots, *backend, opts, cancel.get());
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (interrupt) throw std::move(*interrupt);
  if (failure) std::rethrow_exception(failure);
  return result_dict(result);
}

}  // namespace

void bind_copy(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastckpt::DeviceError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def(
      "cuda_driver_problem",
      []() -> std::optional<std::string> {
        std::string p;
        {
          py::gil_scoped_release nogil;
          p = fastckpt::cuda_driver_problem();
        }
        if (p.empty()) return std::nullopt;
        return p;
      },
      "Why libcuda.so.1 cannot be used here, or None when it can (loads it once).");

  py::class_<CopyBackend, std::shared_ptr<CopyBackend>>(m, "CopyBackend")
      .def_property_readonly("name", [](const CopyBackend& b) { return std::string(b.name()); })
      .def_property_readonly("streams", &CopyBackend::streams)
      // Pin (page-lock for device copies) host memory that Python owns, e.g. a DRAM-tier block;
      // the caller keeps it mapped until unpin. No-ops that count on the fake device.
      .def(
          "pin",
          [](CopyBackend& b, uint64_t address, uint64_t nbytes) {
            py::gil_scoped_release release;
            b.pin(reinterpret_cast<void*>(static_cast<uintptr_t>(address)), nbytes);
          },
          "address"_a, "nbytes"_a)
      .def(
          "unpin",
          [](CopyBackend& b, uint64_t address) {
            py::gil_scoped_release release;
            b.unpin(reinterpret_cast<void*>(static_cast<uintptr_t>(address)));
          },
          "address"_a);

  py::class_<FakeCopyBackend, CopyBackend, std::shared_ptr<FakeCopyBackend>>(m,
                                                                            "FakeCopyBackend")
      .def(py::init([](int streams, double delay_s, bool check, bool copy,
                       int64_t fail_after_copies) {
             if (std::isnan(delay_s) || delay_s < 0 || delay_s > 60)
               throw py::value_error("delay_s must be between 0 and 60, got " +
                                     std::to_string(delay_s));
             const auto delay = std::chrono::duration_cast<std::chrono::nanoseconds>(
                 std::chrono::duration<double>(delay_s));
             return std::make_shared<FakeCopyBackend>(streams, delay, fail_after_copies, check,
                                                      copy);
           }),
           "streams"_a = 4, "delay_s"_a = 0.0, py::kw_only(), "check"_a = true, "copy"_a = true,
           "_fail_after_copies"_a = -1)
      .def("stats",
           [](const FakeCopyBackend& b) {
             const fastckpt::FakeCopyStats s = b.stats();
             py::dict d;
             d["copies"] = s.copies;
             d["bytes_copied"] = s.bytes;
             d["enqueued"] = s.enqueued;
             d["pending"] = s.pending;
             d["max_in_flight"] = s.max_in_flight;
             d["violations"] = s.violations;
             d["violation_notes"] = s.violation_notes;
             d["pins"] = s.pins;
             d["unpins"] = s.unpins;
             d["host_allocs"] = s.host_allocs;
             d["host_frees"] = s.host_frees;
             d["events_recorded"] = s.events_recorded;
             return d;
           })
      .def(
          "drain",
          [](FakeCopyBackend& b) {
            py::gil_scoped_release nogil;
            b.drain();
          },
          "Blocks until every enqueued copy has run.")
      .def("_set_paused", &FakeCopyBackend::set_paused, "paused"_a,
           "Test hook: no stream starts a command while paused.")
      .def(
          "_copy_async",
          [](FakeCopyBackend& b, int stream, uint64_t dst, uint64_t src, uint64_t nbytes) {
            b.copy_async(stream, dst, reinterpret_cast<const void*>(src), nbytes);
          },
          "stream"_a, "dst"_a, "src"_a, "nbytes"_a,
          "Test hook: one copy, enqueued directly (shows the source check at work).");

  py::class_<CudaCopyBackend, CopyBackend, std::shared_ptr<CudaCopyBackend>>(m, "CudaCopyBackend")
      .def_property_readonly("device", &CudaCopyBackend::device);
  m.def(
      "cuda_copy_backend",
      [](int device_index, std::vector<uint64_t> stream_handles) {
        py::gil_scoped_release nogil;  // cuInit may take seconds
        return std::make_shared<CudaCopyBackend>(device_index, std::move(stream_handles));
      },
      "device_index"_a, "stream_handles"_a);

  py::class_<PinnedMemory, std::shared_ptr<PinnedMemory>>(m, "PinnedBuffer",
                                                          py::buffer_protocol())
      .def(py::init([](const std::shared_ptr<CopyBackend>& backend, int64_t nbytes,
                       const std::string& method) {
             if (!backend) throw py::type_error("backend must be a CopyBackend");
             if (nbytes <= 0)
               throw py::value_error("nbytes must be > 0, got " + std::to_string(nbytes));
             const fastckpt::PinMethod how = fastckpt::parse_pin_method(method);
             py::gil_scoped_release nogil;  // pinning gigabytes takes a while
             return std::make_shared<PinnedMemory>(backend, static_cast<uint64_t>(nbytes), how);
           }),
           "backend"_a, "nbytes"_a, "method"_a = "register")
      .def_property_readonly("nbytes", &PinnedMemory::size)
      .def_property_readonly("method",
                             [](const PinnedMemory& p) {
                               return std::string(fastckpt::pin_method_name(p.method()));
                             })
      .def_property_readonly("setup_s", &PinnedMemory::setup_s)
      .def_property_readonly("huge_pages", &PinnedMemory::huge_pages)
      .def_property_readonly(
          "address", [](const PinnedMemory& p) { return reinterpret_cast<uintptr_t>(p.data()); })
      .def("__len__", &PinnedMemory::size)
      .def_buffer([](PinnedMemory& p) {
        return py::buffer_info(p.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(p.size())}, {py::ssize_t{1}}, false);
      });

  py::class_<RangeGate, std::shared_ptr<RangeGate>>(m, "RangeGate")
      .def(py::init<std::string>(), "name"_a = "")
      .def_property_readonly("name", &RangeGate::name)
      .def_property_readonly("ready_bytes", &RangeGate::ready_bytes)
      .def(
          "mark_ready",
          [](RangeGate& g, int64_t lo, int64_t hi) {
            if (lo < 0 || hi < 0) throw py::value_error("lo and hi must be >= 0");
            g.mark_ready(static_cast<uint64_t>(lo), static_cast<uint64_t>(hi));
          },
          "lo"_a, "hi"_a)
      .def("fail", &RangeGate::fail, "errno"_a, "message"_a)
      .def(
          "ready",
          [](const RangeGate& g, int64_t lo, int64_t hi) {
            if (lo < 0 || hi < lo) throw py::value_error("need 0 <= lo <= hi");
            return g.ready(static_cast<uint64_t>(lo), static_cast<uint64_t>(hi));
          },
          "lo"_a, "hi"_a)
      .def(
          "wait",
          [](const RangeGate& g, int64_t lo, int64_t hi, std::optional<double> timeout_s) {
            if (lo < 0 || hi < lo) throw py::value_error("need 0 <= lo <= hi");
            const auto limit = duration_arg(timeout_s, "timeout_s");
            py::gil_scoped_release nogil;
            return g.wait(static_cast<uint64_t>(lo), static_cast<uint64_t>(hi), limit);
          },
          "lo"_a, "hi"_a, "timeout_s"_a = py::none());

  py::class_<SlotSource, std::shared_ptr<SlotSource>>(m, "SlotSource")
      .def(py::init([](int64_t slot_nbytes) {
             if (slot_nbytes <= 0)
               throw py::value_error("slot_nbytes must be > 0, got " +
                                     std::to_string(slot_nbytes));
             return std::make_shared<SlotSource>(static_cast<uint64_t>(slot_nbytes));
           }),
           "slot_nbytes"_a)
      .def("add", &SlotSource::add, "buffer"_a)
      .def_property_readonly("slot_nbytes", &SlotSource::slot_nbytes)
      .def_property_readonly("total", &SlotSource::total)
      .def_property_readonly("available", &SlotSource::available)
      .def_property_readonly("running", &SlotSource::running)
      .def_property_readonly("closed", &SlotSource::closed)
      .def(
          "close",
          [](SlotSource& s, bool cancel_running, std::optional<double> timeout_s) {
            const auto limit = duration_arg(timeout_s, "timeout_s");
            py::gil_scoped_release nogil;
            return s.close(cancel_running, limit);
          },
          py::kw_only(), "cancel_running"_a = true, "timeout_s"_a = py::none());

  py::class_<CancelFlag, std::shared_ptr<CancelFlag>>(m, "CancelFlag")
      .def(py::init<>())
      .def("set", &CancelFlag::set)
      .def_property_readonly("is_set", &CancelFlag::is_set);

  m.def("run_copy_pipeline", &run_copy_pipeline, "engine"_a, "ops"_a, "slots"_a, "backend"_a,
        py::kw_only(), "crc"_a = false, "crc_threads"_a = 4, "cancel"_a = nullptr,
        "max_slots"_a = 0,
        "host_window"_a = 16, "gate_timeout_s"_a = py::none(), "copy_poll_s"_a = 1e-4,
        "_crc_delay_s"_a = 0.0);
}

}  // namespace fastckpt_py

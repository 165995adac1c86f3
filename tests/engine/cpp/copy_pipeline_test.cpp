// The copy pipeline without Python: the engine library on its own, on the fake device. Built
// and run by tests/engine/test_sanitizer.py under ASan + UBSan (-DFASTCKPT_CPP_TESTS=ON).
// Prints one line per check; exits non-zero at the first failure.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "checksum.hpp"
#include "common.hpp"
#include "copy/fake_backend.hpp"
#include "copy/pinned.hpp"
#include "copy/pipeline.hpp"
#include "copy/slot_source.hpp"
#include "engine.hpp"
#include "file.hpp"

using namespace fastckpt;

namespace {

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    std::exit(1);
  }
}

std::vector<uint8_t> random_bytes(size_t n) {
  std::mt19937_64 rng(42);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

std::string write_temp(const std::vector<uint8_t>& data) {
  char name[] = "/tmp/fastckpt-cpp-test-XXXXXX";
  const int fd = ::mkstemp(name);
  check(fd >= 0, "mkstemp");
  check(::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()), "write");
  ::close(fd);
  return name;
}

std::vector<CopyOp> read_ops(const std::shared_ptr<FileHandle>& f, std::vector<uint8_t>& dst,
                             uint64_t piece) {
  std::vector<CopyOp> ops;
  for (uint64_t off = 0; off < dst.size(); off += piece) {
    CopyOp op;
    op.kind = CopyOp::Kind::kRead;
    op.file = f;
    op.offset = off;
    op.nbytes = std::min<uint64_t>(piece, dst.size() - off);
    op.dst = reinterpret_cast<uintptr_t>(dst.data()) + off;
    ops.push_back(op);
  }
  return ops;
}

struct Rig {
  std::shared_ptr<FakeCopyBackend> backend;
  SlotSource slots;
  Rig(int streams, std::chrono::microseconds delay, size_t nslots, uint64_t slot_nbytes)
      : backend(std::make_shared<FakeCopyBackend>(streams, delay)), slots(slot_nbytes) {
    slots.add(std::make_shared<PinnedMemory>(backend, nslots * slot_nbytes, PinMethod::kMemfd));
  }
  void expect_clean(const std::string& what) {
    const FakeCopyStats s = backend->stats();
    check(slots.available() == slots.total(), what + ": every slot back");
    check(s.pending == 0, what + ": no copy pending");
    check(s.violations == 0, what + ": no slot reused early");
  }
};

}  // namespace

int main() {
  const auto data = random_bytes((3u << 20) + 4321);
  const std::string path = write_temp(data);
  auto file = FileHandle::open(path, false);

  {  // bytes land exactly, slots reused many times
    EngineOptions eo;
    eo.kind = EngineKind::kPread;
    eo.chunk_bytes = 16 << 10;
    EngineCore engine(eo);
    Rig rig(3, std::chrono::microseconds(200), 3, 40000);
    std::vector<uint8_t> dst(data.size(), 0);
    PipelineOptions po;
    po.crc = true;
    const auto ops = read_ops(file, dst, 39999);
    const PipelineResult r = run_pipeline(engine, ops, rig.slots, *rig.backend, po, nullptr);
    check(dst == data, "bytes land exactly");
    check(r.copies == ops.size() && r.slots_used == 3, "every op copied through 3 slots");
    check(r.crcs.size() == ops.size() && r.crcs[1] == crc32c(0, data.data() + 39999, 39999),
          "per-op crc");
    rig.expect_clean("success");
    std::puts("ok: bytes land exactly");
  }
  {  // a read error mid-run
    EngineOptions eo;
    eo.kind = EngineKind::kPread;
    eo.fault_after_bytes = 1 << 20;
    EngineCore engine(eo);
    Rig rig(2, std::chrono::microseconds(100), 4, 64 << 10);
    std::vector<uint8_t> dst(data.size(), 0);
    bool raised = false;
    try {
      run_pipeline(engine, read_ops(file, dst, 64 << 10), rig.slots, *rig.backend, {}, nullptr);
    } catch (const IoError& e) {
      raised = e.err() == 5 && e.path() == path;
    }
    check(raised, "a failed read raises IoError(EIO, path)");
    rig.expect_clean("read error");
    std::puts("ok: read error");
  }
  {  // cancelled from another thread
    EngineCore engine(EngineOptions{});
    Rig rig(2, std::chrono::microseconds(2000), 4, 16 << 10);
    std::vector<uint8_t> dst(data.size(), 0);
    CancelFlag cancel;
    std::thread canceller([&] {
      while (rig.backend->stats().enqueued < 4)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      cancel.set();
    });
    bool raised = false;
    try {
      run_pipeline(engine, read_ops(file, dst, 16 << 10), rig.slots, *rig.backend, {}, &cancel);
    } catch (const CancelledError&) {
      raised = true;
    }
    canceller.join();
    check(raised, "cancel raises CancelledError");
    rig.expect_clean("cancel");
    std::puts("ok: cancel");
  }
  ::unlink(path.c_str());
  std::puts("all passed");
  return 0;
}

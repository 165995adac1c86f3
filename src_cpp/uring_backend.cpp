#include "uring_backend.hpp"

#include <atomic>
#include <cerrno>
#include <mutex>

#include "common.hpp"

#ifdef FASTCKPT_HAVE_URING
#include <liburing.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <future>
#include <thread>
#include <unordered_map>
#include <vector>

#include "work_queue.hpp"
#endif

namespace fastckpt {
namespace {

std::atomic<int> g_setup_fault{0};

[[maybe_unused]] std::string describe_setup_error(int err) {
  std::string why = "io_uring_queue_init failed: " + errno_text(err);
  if (err == EPERM)
    why += " (io_uring disabled: kernel.io_uring_disabled sysctl or a seccomp policy)";
  else if (err == ENOSYS)
    why += " (kernel without io_uring, or blocked by a seccomp policy)";
  else if (err == ENOMEM)
    why += " (locked-memory limit too low for the ring)";
  return why;
}

}  // namespace

void set_uring_setup_fault(int err) { g_setup_fault.store(err); }
int uring_setup_fault() { return g_setup_fault.load(); }

#ifndef FASTCKPT_HAVE_URING

UringProbe probe_uring() {
  UringProbe p;
  p.err = ENOSYS;
  p.message = "built without liburing";
  return p;
}

std::unique_ptr<Backend> make_uring_backend(unsigned, IoContext&) {
  throw IoError(ENOSYS, "io_uring unavailable: fastckpt was built without liburing", "");
}

#else

namespace {

UringProbe run_probe() {
  UringProbe p;
  p.compiled = true;
#if defined(FASTCKPT_LIBURING_VERSION)
  p.version = FASTCKPT_LIBURING_VERSION;
#elif defined(IO_URING_VERSION_MAJOR)
  p.version = std::to_string(IO_URING_VERSION_MAJOR) + "." + std::to_string(IO_URING_VERSION_MINOR);
#else
  p.version = "unknown";
#endif
  if (const int forced = g_setup_fault.load()) {
    p.err = forced;
    p.message = describe_setup_error(forced) + " [forced by test hook]";
    return p;
  }
  struct io_uring ring;
  const int rc = io_uring_queue_init(4, &ring, 0);
  if (rc < 0) {
    p.err = -rc;
    p.message = describe_setup_error(-rc);
    return p;
  }
  struct io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  const bool has_read = probe != nullptr && io_uring_opcode_supported(probe, IORING_OP_READ);
  if (probe != nullptr) io_uring_free_probe(probe);
  io_uring_queue_exit(&ring);
  if (!has_read) {
    p.err = ENOSYS;
    p.message = "kernel io_uring lacks IORING_OP_READ (Linux 5.6 or newer needed)";
    return p;
  }
  p.usable = true;
  return p;
}

constexpr unsigned kRegisteredFiles = 64;
constexpr uint64_t kEventTag = ~uint64_t{0};

class UringBackend final : public Backend {
 public:
  UringBackend(unsigned queue_depth, IoContext& ctx) : ctx_(ctx), qd_(queue_depth) {
    efd_ = ::eventfd(0, EFD_CLOEXEC);
    if (efd_ < 0) {
      const int err = errno;
      throw IoError(err, "eventfd failed: " + errno_text(err), "");
    }
    q_.set_on_push([this] { wake(); });
    auto started = ready_.get_future();
    thread_ = std::thread([this] { run(); });
    pthread_setname_np(thread_.native_handle(), "fastckpt-uring");
    const int rc = started.get();
    if (rc != 0) {
      thread_.join();
      ::close(efd_);
      throw IoError(rc, describe_setup_error(rc), "");
    }
  }

  ~UringBackend() override { shutdown(); }

  const char* name() const noexcept override { return "io_uring"; }
  bool enqueue(std::vector<Piece>& pieces) override { return q_.push(pieces); }
  size_t remove_batch(const BatchState* batch) override { return q_.remove_batch(batch); }
  void set_paused(bool paused) override { q_.set_paused(paused); }

  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_m_);
    auto rest = q_.close();
    discard_pieces(rest, "the engine was closed before the batch finished");
    if (thread_.joinable()) thread_.join();
    if (efd_ >= 0) {
      ::close(efd_);
      efd_ = -1;
    }
  }

 private:
  struct Slot {
    Piece p;
    uint64_t done = 0;
    bool use_direct = false;
    int reg = -1;  // registered-file index, -1 = plain fd
  };

  void wake() {
    if (sleeping_.exchange(false)) {
      const uint64_t one = 1;
      ssize_t ignored = ::write(efd_, &one, sizeof one);
      (void)ignored;
    }
  }

  int setup_ring() {
    if (const int forced = g_setup_fault.load()) return forced;
    const unsigned entries = qd_ + 1;  // + the eventfd read
    int rc = -EINVAL;
#if defined(IORING_SETUP_SINGLE_ISSUER) && defined(IORING_SETUP_COOP_TASKRUN)
    // This thread is the ring's only user: let the kernel skip cross-thread bookkeeping.
    rc = io_uring_queue_init(entries, &ring_,
                             IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN);
#endif
    if (rc == -EINVAL) rc = io_uring_queue_init(entries, &ring_, 0);
    if (rc < 0) return -rc;
    // Registered files: a sparse table filled while a file has reads in flight.
    if (io_uring_register_files_sparse(&ring_, kRegisteredFiles) == 0) {
      reg_fd_.assign(kRegisteredFiles, -1);
    } else {
      std::vector<int> empty(kRegisteredFiles, -1);
      if (io_uring_register_files(&ring_, empty.data(), kRegisteredFiles) == 0)
        reg_fd_.assign(kRegisteredFiles, -1);
    }
    reg_refs_.assign(reg_fd_.size(), 0);
    return 0;
  }

  int register_fd(int fd) {
    auto it = reg_index_.find(fd);
    if (it != reg_index_.end()) {
      ++reg_refs_[static_cast<size_t>(it->second)];
      return it->second;
    }
    for (size_t i = 0; i < reg_fd_.size(); ++i) {
      if (reg_fd_[i] != -1) continue;
      if (io_uring_register_files_update(&ring_, static_cast<unsigned>(i), &fd, 1) != 1)
        return -1;
      reg_fd_[i] = fd;
      reg_refs_[i] = 1;
      reg_index_.emplace(fd, static_cast<int>(i));
      return static_cast<int>(i);
    }
    return -1;  // table full: use the plain descriptor
  }

  void release_fd(int idx) {
    if (idx < 0) return;
    const auto i = static_cast<size_t>(idx);
    if (--reg_refs_[i] != 0) return;
    // Unregister now: once no read is in flight the descriptor may be closed and reused.
    int none = -1;
    (void)io_uring_register_files_update(&ring_, static_cast<unsigned>(i), &none, 1);
    reg_index_.erase(reg_fd_[i]);
    reg_fd_[i] = -1;
  }

  io_uring_sqe* get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void arm_eventfd() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, efd_, &efd_value_, sizeof efd_value_, 0);
    io_uring_sqe_set_data64(sqe, kEventTag);
  }

  // Prepares the read of the remainder of slot `s`.
  void prep(size_t s) {
    Slot& sl = slots_[s];
    const uint64_t off = sl.p.offset + sl.done;
    char* dst = sl.p.dest + sl.done;
    const uint64_t want = sl.p.len - sl.done;
    if (sl.use_direct &&
        !(is_aligned(off) && is_aligned(want) && is_aligned(reinterpret_cast<uintptr_t>(dst))))
      sl.use_direct = false;
    const int fd = sl.use_direct ? sl.p.file->direct_fd() : sl.p.file->buffered_fd();
    if (sl.reg < 0 || reg_fd_[static_cast<size_t>(sl.reg)] != fd) {
      release_fd(sl.reg);
      sl.reg = register_fd(fd);
    }
    io_uring_sqe* sqe = get_sqe();
    if (sl.reg >= 0) {
      io_uring_prep_read(sqe, sl.reg, dst, static_cast<unsigned>(want), off);
      sqe->flags |= IOSQE_FIXED_FILE;
    } else {
      io_uring_prep_read(sqe, fd, dst, static_cast<unsigned>(want), off);
    }
    io_uring_sqe_set_data64(sqe, s);
  }

  void start(Piece&& p) {
    if (p.batch->cancelled()) {
      p.batch->pieces_discarded(1);
      return;
    }
    const size_t s = free_.back();
    free_.pop_back();
    Slot& sl = slots_[s];
    sl.p = std::move(p);
    sl.done = 0;
    sl.use_direct = sl.p.direct;
    sl.reg = -1;
    ++inflight_;
    prep(s);
  }

  void finish(size_t s) {
    Slot& sl = slots_[s];
    release_fd(sl.reg);
    sl.reg = -1;
    sl.p = Piece{};
    free_.push_back(s);
    --inflight_;
  }

  void complete(size_t s, int res) {
    Slot& sl = slots_[s];
    BatchState& batch = *sl.p.batch;
    const uint64_t off = sl.p.offset + sl.done;
    const uint64_t want = sl.p.len - sl.done;
    if (res < 0) {
      const int err = -res;
      if ((err == EINTR || err == EAGAIN) && !batch.cancelled()) return prep(s);
      if (err == EINVAL && sl.use_direct && !batch.cancelled()) {
        sl.use_direct = false;  // alignment the device refuses: go buffered
        return prep(s);
      }
      if (err == ECANCELED || batch.cancelled())
        batch.pieces_discarded(1);
      else
        batch.piece_failed(err, read_error_message(err, off, want), sl.p.file->path());
      return finish(s);
    }
    if (res == 0) {
      batch.piece_failed(ENODATA, eof_message(off, want, sl.p.len), sl.p.file->path());
      return finish(s);
    }
    if (ctx_.fault(static_cast<uint64_t>(res), sl.use_direct)) {
      batch.piece_failed(ctx_.fault_errno, injected_fault_message(ctx_.fault_errno, off, want),
                         sl.p.file->path());
      return finish(s);
    }
    sl.done += static_cast<uint64_t>(res);
    if (sl.done == sl.p.len) {
      batch.piece_finished(sl.p.req);
      return finish(s);
    }
    if (batch.cancelled()) {
      batch.pieces_discarded(1);
      return finish(s);
    }
    prep(s);  // short read: ask for the rest
  }

  void run() {
    const int rc = setup_ring();
    ready_.set_value(rc);
    if (rc != 0) return;
    slots_.resize(qd_);
    for (size_t i = qd_; i-- > 0;) free_.push_back(i);
    arm_eventfd();
    io_uring_submit(&ring_);
    for (;;) {
      Piece p;
      while (inflight_ < qd_ && q_.try_pop(p)) start(std::move(p));
      if (inflight_ == 0) {
        if (!q_.pop_wait(p)) break;  // closed and drained
        start(std::move(p));
        continue;
      }
      // Sleep in the kernel until a read completes or a submitter writes the eventfd.
      sleeping_.store(true);
      if (inflight_ < qd_ && q_.try_pop(p)) {
        sleeping_.store(false);
        start(std::move(p));
        continue;
      }
      io_uring_cqe* cqe = nullptr;
      int w = io_uring_submit_and_wait(&ring_, 1);
      if (w < 0 && w != -EINTR && w != -EAGAIN && w != -EBUSY) fail_all(-w);
      sleeping_.store(false);
      while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
        const uint64_t tag = io_uring_cqe_get_data64(cqe);
        const int res = cqe->res;
        io_uring_cqe_seen(&ring_, cqe);
        if (tag == kEventTag) {
          if (res != -ECANCELED) arm_eventfd();
          continue;
        }
        complete(static_cast<size_t>(tag), res);
      }
    }
    io_uring_queue_exit(&ring_);
  }

  // The ring itself broke (should not happen): fail every read in flight and stop using them.
  [[noreturn]] void fail_all(int err) {
    // Without a working ring the in-flight reads cannot be reaped; the destinations may still
    // be written by the kernel, so the only safe course is to stop the process loudly.
    std::string msg = "fastckpt: io_uring_submit_and_wait failed: " + errno_text(err) + "\n";
    ssize_t ignored = ::write(2, msg.data(), msg.size());
    (void)ignored;
    std::abort();
  }

  IoContext& ctx_;
  unsigned qd_;
  WorkQueue q_;
  std::promise<int> ready_;
  std::thread thread_;
  std::mutex shutdown_m_;
  io_uring ring_{};
  int efd_ = -1;
  uint64_t efd_value_ = 0;
  std::atomic<bool> sleeping_{false};
  std::vector<Slot> slots_;
  std::vector<size_t> free_;
  unsigned inflight_ = 0;
  std::vector<int> reg_fd_;
  std::vector<unsigned> reg_refs_;
  std::unordered_map<int, int> reg_index_;
};

}  // namespace

UringProbe probe_uring() {
  if (g_setup_fault.load() != 0) return run_probe();
  static const UringProbe cached = run_probe();
  return cached;
}

std::unique_ptr<Backend> make_uring_backend(unsigned queue_depth, IoContext& ctx) {
  return std::make_unique<UringBackend>(queue_depth, ctx);
}

#endif  // FASTCKPT_HAVE_URING

}  // namespace fastckpt

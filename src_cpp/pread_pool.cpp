#include "pread_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <cerrno>

namespace fastckpt {

std::string read_error_message(int err, uint64_t offset, uint64_t nbytes) {
  return errno_text(err) + " reading " + std::to_string(nbytes) + " bytes at offset " +
         std::to_string(offset);
}

std::string eof_message(uint64_t offset, uint64_t missing, uint64_t nbytes) {
  return "unexpected end of file at offset " + std::to_string(offset) + ": " +
         std::to_string(missing) + " of " + std::to_string(nbytes) +
         " bytes missing (the file is shorter than when the read was planned)";
}

std::string injected_fault_message(int err, uint64_t offset, uint64_t nbytes) {
  return errno_text(err) + " (injected fault) reading " + std::to_string(nbytes) +
         " bytes at offset " + std::to_string(offset);
}

PreadPool::PreadPool(unsigned threads, IoContext& ctx) : ctx_(ctx) {
  threads_.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    threads_.emplace_back([this] { worker(); });
    pthread_setname_np(threads_.back().native_handle(), "fastckpt-pread");
  }
}

PreadPool::~PreadPool() { shutdown(); }

void PreadPool::shutdown() {
  auto rest = q_.close();
  discard_pieces(rest, "the engine was closed before the batch finished");
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void PreadPool::worker() {
  Piece p;
  while (q_.pop_wait(p)) {
    run(p);
    p = Piece{};  // drop the batch reference before sleeping
  }
}

void PreadPool::run(Piece& p) {
  BatchState& batch = *p.batch;
  if (batch.cancelled()) {
    batch.pieces_discarded(1);
    return;
  }
  uint64_t done = 0;
  bool use_direct = p.direct;
  while (done < p.len) {
    const uint64_t off = p.offset + done;
    char* dst = p.dest + done;
    const uint64_t want = p.len - done;
    if (use_direct && !(is_aligned(off) && is_aligned(want) &&
                        is_aligned(reinterpret_cast<uintptr_t>(dst))))
      use_direct = false;  // the remainder of a short read is no longer aligned
    const int fd = use_direct ? p.file->direct_fd() : p.file->buffered_fd();
    const ssize_t r = ::pread(fd, dst, want, static_cast<off_t>(off));
    if (r < 0) {
      const int err = errno;
      if (err == EINTR || err == EAGAIN) continue;
      if (err == EINVAL && use_direct) {  // alignment the device refuses: go buffered
        use_direct = false;
        continue;
      }
      batch.piece_failed(err, read_error_message(err, off, want), p.file->path());
      return;
    }
    if (r == 0) {
      batch.piece_failed(ENODATA, eof_message(off, want, p.len), p.file->path());
      return;
    }
    if (ctx_.fault(static_cast<uint64_t>(r), use_direct)) {
      batch.piece_failed(ctx_.fault_errno, injected_fault_message(ctx_.fault_errno, off, want),
                         p.file->path());
      return;
    }
    done += static_cast<uint64_t>(r);
  }
  batch.piece_finished(p.req);
}

}  // namespace fastckpt

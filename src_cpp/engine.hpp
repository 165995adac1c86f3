// The engine: validates a batch of reads, splits them into pieces, routes each piece to a backend
// (io_uring ring or pread pool) and lets the caller wait for completions.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"
#include "batch.hpp"
#include "file.hpp"

namespace fastckpt {

enum class EngineKind { kAuto, kUring, kPread };
// Which backend serves buffered (non-O_DIRECT) pieces when the engine has a ring.
enum class BufferedRoute { kDefault, kUring, kPread };

struct EngineOptions {
  EngineKind kind = EngineKind::kAuto;
  unsigned queue_depth = 32;
  unsigned threads = 2;
  uint64_t chunk_bytes = uint64_t{4} << 20;
  BufferedRoute buffered_route = BufferedRoute::kDefault;
  int64_t fault_after_bytes = -1;  // test hook: fail reads once this many bytes were read
  int fault_errno = 5;             // EIO
};

// What an engine with these options uses, and why (also answered without building one).
struct EngineChoice {
  std::string name;             // "io_uring" | "pread"
  std::string reason;
  std::string direct_backend;   // backend serving O_DIRECT pieces
  std::string buffered_backend; // backend serving buffered pieces
  bool uring_compiled = false;
  bool uring_usable = false;
  int uring_errno = 0;
  std::string uring_error;
  std::string liburing_version;
};

// Throws IoError when io_uring is forced but unavailable.
EngineChoice choose_engine(const EngineOptions& opts);

struct ReadSpec {
  std::shared_ptr<FileHandle> file;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  char* dest = nullptr;
  uint64_t dest_len = 0;
  uint64_t dest_offset = 0;
  int64_t tag = 0;
};

// The one check of the engine's numeric limits (std::invalid_argument naming the setting):
// queue_depth 1..4096, threads 1..256, chunk_bytes a multiple of 4096 in 4 KiB..1 GiB. The
// bindings call it before narrowing Python integers; the engine calls it again on its options.
void check_engine_limits(int64_t queue_depth, int64_t threads, int64_t chunk_bytes);

class EngineCore {
 public:
  // Throws std::invalid_argument for bad options, IoError when io_uring is forced but unusable.
  explicit EngineCore(const EngineOptions& opts);
  ~EngineCore();
  EngineCore(const EngineCore&) = delete;
  EngineCore& operator=(const EngineCore&) = delete;

  // Validates every read (std::invalid_argument naming the read; IoError when a file cannot be
  // stat'ed), then queues them. With `check_file_size` false the file-size check is skipped (a
  // test hook for files that shrink after planning). `notifier` (optional) is signalled on
  // every change of the batch (see BatchState).
  std::shared_ptr<BatchState> submit(const std::vector<ReadSpec>& reads,
                                     bool check_file_size = true,
                                     std::shared_ptr<Notifier> notifier = nullptr);
  // Stops the batch's queued reads and waits for its running ones. Idempotent.
  void cancel(BatchState& batch, const std::string& reason);
  // Cancels everything queued, waits for running reads, stops the threads. Idempotent.
  void close();
  bool closed() const;

  const EngineChoice& choice() const noexcept { return choice_; }
  const EngineOptions& options() const noexcept { return opts_; }
  uint64_t bytes_read() const noexcept { return ctx_.bytes_read.load(); }
  uint64_t bytes_direct() const noexcept { return ctx_.bytes_direct.load(); }
  // Test hook: hold queued reads (running ones finish) until unpaused.
  void set_paused(bool paused);

 private:
  EngineOptions opts_;
  EngineChoice choice_;
  IoContext ctx_;
  std::unique_ptr<Backend> ring_;
  std::unique_ptr<Backend> pool_;         // buffered pieces (`threads` workers)
  std::unique_ptr<Backend> direct_pool_;  // O_DIRECT pieces without a ring (`queue_depth` workers)
  Backend* direct_route_ = nullptr;
  Backend* buffered_route_ = nullptr;
  mutable std::mutex m_;
  bool closed_ = false;
  int pid_ = 0;  // the threads exist only in the process that created the engine
};

// The one message for an object used in a child of the process that created it.
std::string forked_message(const std::string& what, const std::string& fix);

}  // namespace fastckpt

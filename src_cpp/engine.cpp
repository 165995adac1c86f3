#include "engine.hpp"

#include <unistd.h>

#include <algorithm>
#include <stdexcept>
#include <unordered_map>

#include "pread_pool.hpp"
#include "uring_backend.hpp"

namespace fastckpt {
namespace {

constexpr int64_t kMaxQueueDepth = 4096;
constexpr int64_t kMaxThreads = 256;
constexpr int64_t kMaxChunkBytes = int64_t{1} << 30;
constexpr unsigned kMaxDirectThreads = 64;

// In an io_uring engine, buffered pieces go to the pread pool unless told otherwise: a page-cache
// read is a memory copy, which io_uring performs inline on its single submitting thread, while
// the pool copies on all its threads at once (see benchmarks/engine.py).
constexpr bool kBufferedOnPool = true;

std::string where(size_t i, const ReadSpec& r) {
  return "read " + std::to_string(i) + " (file '" + r.file->path() + "', offset " +
         std::to_string(r.offset) + ", nbytes " + std::to_string(r.nbytes) + ")";
}

}  // namespace

std::string forked_message(const std::string& what, const std::string& fix) {
  return "the " + what + " was created in another process (before fork()); its threads do not " +
         "exist here: " + fix;
}

EngineChoice choose_engine(const EngineOptions& opts) {
  EngineChoice c;
  const UringProbe probe = probe_uring();
  c.uring_compiled = probe.compiled;
  c.uring_usable = probe.usable;
  c.uring_errno = probe.err;
  c.uring_error = probe.message;
  c.liburing_version = probe.version;
  const std::string pool = "pread pool";
  switch (opts.kind) {
    case EngineKind::kPread:
      c.name = "pread";
      c.reason = "pread pool requested (O_DIRECT reads: " +
                 std::to_string(std::min(opts.queue_depth, kMaxDirectThreads)) +
                 " threads; buffered reads: " + std::to_string(opts.threads) + " threads)";
      c.direct_backend = c.buffered_backend = "pread";
      break;
    case EngineKind::kUring:
      if (!probe.usable)
        throw IoError(probe.err, "io_uring was requested but is unavailable: " + probe.message,
                      "");
      c.name = "io_uring";
      c.reason = "io_uring requested";
      c.direct_backend = "io_uring";
      c.buffered_backend = opts.buffered_route == BufferedRoute::kPread ? "pread" : "io_uring";
      break;
    case EngineKind::kAuto:
      if (!probe.usable) {
        c.name = "pread";
        c.reason = "auto: io_uring unavailable (" + probe.message + "); using the pread pool";
        c.reason += " (O_DIRECT reads: " +
                    std::to_string(std::min(opts.queue_depth, kMaxDirectThreads)) +
                    " threads; buffered reads: " + std::to_string(opts.threads) + " threads)";
        c.direct_backend = c.buffered_backend = "pread";
        break;
      }
      c.name = "io_uring";
      c.direct_backend = "io_uring";
      if (opts.buffered_route == BufferedRoute::kUring ||
          (opts.buffered_route == BufferedRoute::kDefault && !kBufferedOnPool)) {
        c.buffered_backend = "io_uring";
        c.reason = "auto: io_uring usable; all reads on io_uring";
      } else {
        c.buffered_backend = "pread";
        c.reason =
            "auto: io_uring usable; O_DIRECT reads on io_uring (queue depth " +
            std::to_string(opts.queue_depth) + "), buffered (page-cache) reads on the " +
            std::to_string(opts.threads) +
            "-thread pread pool, which copies on several cores at once";
      }
      break;
  }
  return c;
}

void check_engine_limits(int64_t queue_depth, int64_t threads, int64_t chunk_bytes) {
  if (queue_depth < 1 || queue_depth > kMaxQueueDepth)
    throw std::invalid_argument("queue_depth=" + std::to_string(queue_depth) +
                                ": must be between 1 and " + std::to_string(kMaxQueueDepth));
  if (threads < 1 || threads > kMaxThreads)
    throw std::invalid_argument("threads=" + std::to_string(threads) +
                                ": must be between 1 and " + std::to_string(kMaxThreads));
  if (chunk_bytes < static_cast<int64_t>(kDirectAlign) ||
      !is_aligned(static_cast<uint64_t>(chunk_bytes)) || chunk_bytes > kMaxChunkBytes)
    throw std::invalid_argument("chunk_bytes=" + std::to_string(chunk_bytes) +
                                ": must be a multiple of 4096 between 4096 and " +
                                std::to_string(kMaxChunkBytes));
}

EngineCore::EngineCore(const EngineOptions& opts) : opts_(opts) {
  check_engine_limits(opts.queue_depth, opts.threads, static_cast<int64_t>(opts.chunk_bytes));
  pid_ = static_cast<int>(::getpid());
  ctx_.fault_after_bytes = opts.fault_after_bytes;
  ctx_.fault_errno = opts.fault_errno;
  choice_ = choose_engine(opts);
  const bool wants_ring = choice_.direct_backend == "io_uring" ||
                          choice_.buffered_backend == "io_uring";
  if (wants_ring) {
    try {
      ring_ = make_uring_backend(opts.queue_depth, ctx_);
    } catch (const IoError& e) {
      if (opts.kind == EngineKind::kUring) throw;
      choice_.name = "pread";
      choice_.reason = std::string("auto: io_uring ring setup failed (") + e.what() +
                       "); using the pread pool";
      choice_.direct_backend = choice_.buffered_backend = "pread";
    }
  }
  if (choice_.buffered_backend == "pread")
    pool_ = std::make_unique<PreadPool>(opts.threads, ctx_);
  if (choice_.direct_backend == "pread") {
    // Blocking O_DIRECT reads keep one request in flight per thread: size this pool like a
    // queue (threads mostly sleep in the kernel), apart from the copy-bound buffered pool.
    direct_pool_ = std::make_unique<PreadPool>(std::min(opts.queue_depth, kMaxDirectThreads),
                                               ctx_);
  }
  direct_route_ = ring_ ? ring_.get() : direct_pool_.get();
  buffered_route_ = choice_.buffered_backend == "io_uring" ? ring_.get() : pool_.get();
}

EngineCore::~EngineCore() { close(); }

bool EngineCore::closed() const {
  std::lock_guard<std::mutex> lock(m_);
  return closed_;
}

void EngineCore::close() {
  {
    std::lock_guard<std::mutex> lock(m_);
    closed_ = true;
  }
  if (ring_) ring_->shutdown();
  if (pool_) pool_->shutdown();
  if (direct_pool_) direct_pool_->shutdown();
}

std::shared_ptr<BatchState> EngineCore::submit(const std::vector<ReadSpec>& reads,
                                               bool check_file_size,
                                               std::shared_ptr<Notifier> notifier) {
  if (closed()) throw std::invalid_argument("the engine is closed");
  if (static_cast<int>(::getpid()) != pid_)
    throw std::invalid_argument(forked_message("engine", "create a new Engine in this process"));
  std::unordered_map<const FileHandle*, uint64_t> sizes;
  std::vector<std::shared_ptr<FileHandle>> files;
  std::vector<int64_t> tags;
  tags.reserve(reads.size());
  for (size_t i = 0; i < reads.size(); ++i) {
    const ReadSpec& r = reads[i];
    if (!r.file) throw std::invalid_argument("read " + std::to_string(i) + ": the file is closed");
    auto it = sizes.find(r.file.get());
    if (it == sizes.end()) {
      it = sizes.emplace(r.file.get(), r.file->current_size()).first;
      files.push_back(r.file);
    }
    const uint64_t size = it->second;
    if (check_file_size && (r.nbytes > size || r.offset > size - r.nbytes)) {
      std::string msg = where(i, r) + ": the range ends at byte " +
                        std::to_string(r.offset + r.nbytes) + " but the file is " +
                        std::to_string(size) + " bytes long";
      if (size != r.file->size())
        msg += " (it was " + std::to_string(r.file->size()) + " bytes when opened)";
      throw std::invalid_argument(msg);
    }
    if (r.nbytes > r.dest_len || r.dest_offset > r.dest_len - r.nbytes)
      throw std::invalid_argument(where(i, r) + ": destination range [" +
                                  std::to_string(r.dest_offset) + ", " +
                                  std::to_string(r.dest_offset + r.nbytes) +
                                  ") exceeds the destination's " + std::to_string(r.dest_len) +
                                  " bytes");
    tags.push_back(r.tag);
  }

  auto batch =
      std::make_shared<BatchState>(std::move(tags), std::move(files), std::move(notifier));
  std::vector<Piece> direct_pieces;
  std::vector<Piece> buffered_pieces;
  const bool one_route = direct_route_ == buffered_route_;
  const uint64_t chunk = opts_.chunk_bytes;
  for (size_t i = 0; i < reads.size(); ++i) {
    const ReadSpec& r = reads[i];
    const auto req = static_cast<uint32_t>(i);
    uint32_t count = 0;
    auto add = [&](uint64_t off, uint64_t len, char* dst, bool direct) {
      auto& out = (direct || one_route) ? direct_pieces : buffered_pieces;
      while (len > 0) {
        const uint64_t n = std::min(len, chunk);
        out.push_back(Piece{batch, r.file.get(), off, n, dst, req, direct});
        off += n;
        dst += n;
        len -= n;
        ++count;
      }
    };
    char* dst = r.dest + r.dest_offset;
    const uint64_t end = r.offset + r.nbytes;
    const auto addr = reinterpret_cast<uintptr_t>(dst);
    bool split = false;
    if (r.file->direct() && (addr & (kDirectAlign - 1)) == (r.offset & (kDirectAlign - 1))) {
      // File offset and memory address share their alignment: the aligned middle goes through
      // O_DIRECT, an unaligned head or tail (at most 4 KiB - 1 each) through the page cache.
      const uint64_t head_end = std::min(align_up(r.offset), end);
      const uint64_t mid_end = align_down(end);
      if (mid_end > head_end) {
        add(r.offset, head_end - r.offset, dst, false);
        add(head_end, mid_end - head_end, dst + (head_end - r.offset), true);
        add(mid_end, end - mid_end, dst + (mid_end - r.offset), false);
        split = true;
      }
    }
    if (!split) add(r.offset, r.nbytes, dst, false);
    if (count > 0) batch->add_pieces(req, count);
  }
  batch->complete_empty_requests();

  std::lock_guard<std::mutex> lock(m_);
  if (closed_) throw std::invalid_argument("the engine is closed");
  // A backend whose queue is already closed queues nothing: discard those pieces (cancelling
  // the batch) so that waiting on it ends instead of hanging.
  if (!direct_pieces.empty() && !direct_route_->enqueue(direct_pieces))
    discard_pieces(direct_pieces, "the engine was closed before the batch was queued");
  if (!buffered_pieces.empty() && !buffered_route_->enqueue(buffered_pieces))
    discard_pieces(buffered_pieces, "the engine was closed before the batch was queued");
  return batch;
}

void EngineCore::set_paused(bool paused) {
  if (ring_) ring_->set_paused(paused);
  if (pool_) pool_->set_paused(paused);
  if (direct_pool_) direct_pool_->set_paused(paused);
}

void EngineCore::cancel(BatchState& batch, const std::string& reason) {
  batch.mark_cancelled(reason);
  size_t removed = 0;
  if (ring_) removed += ring_->remove_batch(&batch);
  if (pool_) removed += pool_->remove_batch(&batch);
  if (direct_pool_) removed += direct_pool_->remove_batch(&batch);
  batch.pieces_discarded(removed);
  batch.wait_quiescent();
}

}  // namespace fastckpt

#include "copy/fake_backend.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "checksum.hpp"

namespace fastckpt {
namespace {

constexpr size_t kMaxNotes = 8;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

FakeCopyBackend::FakeCopyBackend(int streams, std::chrono::nanoseconds delay,
                                 int64_t fail_after_copies, bool check, bool copy)
    : delay_(delay), fail_after_copies_(fail_after_copies), check_(check && copy), copy_(copy) {
  if (streams < 1 || streams > 64)
    throw std::invalid_argument("streams=" + std::to_string(streams) +
                                ": must be between 1 and 64");
  if (delay.count() < 0) throw std::invalid_argument("delay must be >= 0");
  for (int i = 0; i < streams; ++i) {
    streams_.push_back(std::make_unique<Stream>());
    Stream& s = *streams_.back();
    s.worker = std::thread([this, &s, i] { run(s, i); });
    pthread_setname_np(s.worker.native_handle(), "fastckpt-fakecp");
  }
}

FakeCopyBackend::~FakeCopyBackend() {
  if (static_cast<int>(::getpid()) != owner_pid()) {
    // A child of fork(): the workers (and whoever held these locks) do not exist here. Touch
    // nothing; the std::thread objects are leaked so that destroying them cannot terminate.
    auto* leaked = new std::vector<std::thread>();
    for (auto& s : streams_) leaked->push_back(std::move(s->worker));
    for (auto& s : streams_) (void)s.release();  // their mutexes may be held: never destroy
    return;
  }
  for (auto& s : streams_) {
    {
      std::lock_guard<std::mutex> lock(s->m);
      s->stop = true;
    }
    s->cv.notify_all();
  }
  for (auto& s : streams_)
    if (s->worker.joinable()) s->worker.join();
}

FakeCopyBackend::Stream& FakeCopyBackend::stream_at(int stream) {
  if (stream < 0 || stream >= streams())
    throw std::invalid_argument("stream " + std::to_string(stream) + ": the device has " +
                                std::to_string(streams()) + " streams");
  return *streams_[static_cast<size_t>(stream)];
}

void FakeCopyBackend::copy_async(int stream, uint64_t dst, const void* src, uint64_t n) {
  Stream& s = stream_at(stream);
  if (n > 0 && (dst == 0 || src == nullptr))
    throw std::invalid_argument("fake device: copy of " + std::to_string(n) +
                                " bytes with a null address");
  Command c;
  c.is_copy = true;
  c.dst = dst;
  c.src = src;
  c.n = n;
  if (check_) c.crc = crc32c(0, src, n);
  {
    std::lock_guard<std::mutex> lock(stats_m_);
    if (fail_after_copies_ >= 0 && stats_.enqueued >= static_cast<uint64_t>(fail_after_copies_))
      throw DeviceError("fake device: copy " + std::to_string(stats_.enqueued) +
                        " refused (injected failure after " +
                        std::to_string(fail_after_copies_) + " copies)");
    c.seq = stats_.enqueued++;
    ++stats_.pending;
    stats_.max_in_flight = std::max(stats_.max_in_flight, stats_.pending);
  }
  {
    std::lock_guard<std::mutex> lock(s.m);
    s.queue.push_back(c);
  }
  s.cv.notify_all();
}

Event FakeCopyBackend::record(int stream) {
  Stream& s = stream_at(stream);
  Event e;
  e.stream = stream;
  {
    std::lock_guard<std::mutex> lock(s.m);
    Command c;
    c.seq = ++s.tickets;
    s.queue.push_back(c);
    e.seq = c.seq;
  }
  s.cv.notify_all();
  {
    std::lock_guard<std::mutex> lock(stats_m_);
    ++stats_.events_recorded;
  }
  return e;
}

bool FakeCopyBackend::query(const Event& e) {
  Stream& s = stream_at(e.stream);
  std::lock_guard<std::mutex> lock(s.m);
  return s.passed >= e.seq;
}

void FakeCopyBackend::synchronize(const Event& e) {
  Stream& s = stream_at(e.stream);
  std::unique_lock<std::mutex> lock(s.m);
  s.cv.wait(lock, [&] { return s.passed >= e.seq; });
}

void FakeCopyBackend::drain() {
  for (int i = 0; i < streams(); ++i) synchronize(record(i));
}

void FakeCopyBackend::set_paused(bool paused) {
  paused_.store(paused);
  for (auto& s : streams_) {
    std::lock_guard<std::mutex> lock(s->m);  // a worker between its check and its wait sees it
    s->cv.notify_all();
  }
}

void FakeCopyBackend::run(Stream& s, int index) {
  std::unique_lock<std::mutex> lock(s.m);
  for (;;) {
    s.cv.wait(lock, [&] { return s.stop || (!paused_.load() && !s.queue.empty()); });
    if (s.queue.empty()) return;  // stopped and drained (a pause ends at destruction)
    const Command c = s.queue.front();
    s.queue.pop_front();
    if (c.is_copy) {
      lock.unlock();
      execute(c, index);
      lock.lock();
    } else {
      s.passed = c.seq;
      s.cv.notify_all();
    }
  }
}

void FakeCopyBackend::execute(const Command& c, int stream) {
  if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
  if (c.n > 0 && copy_) std::memcpy(reinterpret_cast<void*>(c.dst), c.src, c.n);
  const uint32_t landed = check_ ? crc32c(0, reinterpret_cast<const void*>(c.dst), c.n) : c.crc;
  std::lock_guard<std::mutex> lock(stats_m_);
  --stats_.pending;
  ++stats_.copies;
  stats_.bytes += c.n;
  if (landed != c.crc) {
    ++stats_.violations;
    if (stats_.violation_notes.size() < kMaxNotes)
      stats_.violation_notes.push_back(
          "copy " + std::to_string(c.seq) + " on stream " + std::to_string(stream) + " (" +
          std::to_string(c.n) + " bytes from " + hex(reinterpret_cast<uintptr_t>(c.src)) +
          " to " + hex(c.dst) + "): the source changed between copy_async (crc32c " +
          hex(c.crc) + ") and the copy (" + hex(landed) + ")");
  }
}

void FakeCopyBackend::pin(void*, uint64_t) {
  std::lock_guard<std::mutex> lock(stats_m_);
  ++stats_.pins;
}

void FakeCopyBackend::unpin(void*) noexcept {
  if (static_cast<int>(::getpid()) != owner_pid()) return;  // a fork child: the lock may be held
  std::lock_guard<std::mutex> lock(stats_m_);
  ++stats_.unpins;
}

void* FakeCopyBackend::host_alloc(uint64_t n) {
  auto buf = std::make_unique<AlignedBuffer>(static_cast<size_t>(n));
  void* p = buf->data();
  std::lock_guard<std::mutex> lock(stats_m_);
  ++stats_.host_allocs;
  allocs_.emplace(p, std::move(buf));
  return p;
}

void FakeCopyBackend::host_free(void* p, uint64_t) noexcept {
  if (static_cast<int>(::getpid()) != owner_pid()) return;  // a fork child: leaked
  std::unique_ptr<AlignedBuffer> buf;
  std::lock_guard<std::mutex> lock(stats_m_);
  auto it = allocs_.find(p);
  if (it == allocs_.end()) return;
  buf = std::move(it->second);
  allocs_.erase(it);
  ++stats_.host_frees;
}

FakeCopyStats FakeCopyBackend::stats() const {
  std::lock_guard<std::mutex> lock(stats_m_);
  return stats_;
}

}  // namespace fastckpt

// Backend: N threads each issuing blocking pread(2) calls. Parallel memory copies make it the
// faster choice for page-cached (buffered) reads; it needs no kernel support beyond pread.
#pragma once

#include <thread>
#include <vector>

#include "backend.hpp"
#include "work_queue.hpp"

namespace fastckpt {

class PreadPool final : public Backend {
 public:
  PreadPool(unsigned threads, IoContext& ctx);
  ~PreadPool() override;
  const char* name() const noexcept override { return "pread"; }
  bool enqueue(std::vector<Piece>& pieces) override { return q_.push(pieces); }
  size_t remove_batch(const BatchState* batch) override { return q_.remove_batch(batch); }
  void shutdown() override;
  void set_paused(bool paused) override { q_.set_paused(paused); }

 private:
  void worker();
  void run(Piece& p);
  IoContext& ctx_;
  WorkQueue q_;
  std::vector<std::thread> threads_;
};

}  // namespace fastckpt

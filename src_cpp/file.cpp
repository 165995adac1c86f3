#include "file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.hpp"

namespace fastckpt {
namespace {

constexpr long kTmpfsMagic = 0x01021994;
constexpr long kRamfsMagic = 0x858458f6;

}  // namespace

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns a pointer that may or may not be `buf`.
  const char* text = strerror_r(err, buf, sizeof buf);
  return text != nullptr ? std::string(text) : std::string("errno ") + std::to_string(err);
}

std::shared_ptr<FileHandle> FileHandle::open(const std::string& path, bool want_direct,
                                             bool allow_special) {
  std::shared_ptr<FileHandle> f(new FileHandle());
  f->path_ = path;
  // Non-blocking so that a FIFO or device never blocks the open; cleared below for a regular
  // file (io_uring would otherwise answer EAGAIN instead of waiting for the disk).
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f->fd_ < 0) {
    const int err = errno;
    throw IoError(err, "cannot open for reading: " + errno_text(err), path);
  }
  return finish(std::move(f), want_direct, allow_special, path);
}

std::shared_ptr<FileHandle> FileHandle::adopt(int fd, const std::string& path, bool want_direct) {
  std::shared_ptr<FileHandle> f(new FileHandle());
  f->path_ = path;
  f->fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (f->fd_ < 0) {
    const int err = errno;
    throw IoError(err, "cannot duplicate the descriptor: " + errno_text(err), path);
  }
  return finish(std::move(f), want_direct, false, "/proc/self/fd/" + std::to_string(f->fd_));
}

std::shared_ptr<FileHandle> FileHandle::finish(std::shared_ptr<FileHandle> f, bool want_direct,
                                               bool allow_special,
                                               const std::string& direct_path) {
  const std::string& path = f->path_;
  struct stat st {};
  if (::fstat(f->fd_, &st) != 0) {
    const int err = errno;
    throw IoError(err, "cannot stat: " + errno_text(err), path);
  }
  if (!allow_special && !S_ISREG(st.st_mode)) {
    const int err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    throw IoError(err, S_ISDIR(st.st_mode) ? "is a directory, not a file" : "not a regular file",
                  path);
  }
  f->size_ = static_cast<uint64_t>(st.st_size);
  const int fl = ::fcntl(f->fd_, F_GETFL);
  if (fl >= 0 && (fl & O_NONBLOCK) != 0) (void)::fcntl(f->fd_, F_SETFL, fl & ~O_NONBLOCK);
  if (!want_direct) {
    (void)::posix_fadvise(f->fd_, 0, 0, POSIX_FADV_SEQUENTIAL);  // larger readahead window
    return f;
  }

  struct statfs sfs {};
  if (::fstatfs(f->fd_, &sfs) == 0 &&
      (static_cast<long>(sfs.f_type) == kTmpfsMagic ||
       static_cast<long>(sfs.f_type) == kRamfsMagic)) {
    f->direct_note_ = "file is in memory (tmpfs/ramfs): buffered reads";
    return f;
  }
  f->direct_fd_ = ::open(direct_path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (f->direct_fd_ < 0) {
    f->direct_note_ = "filesystem refused O_DIRECT (" + errno_text(errno) + "): buffered reads";
    return f;
  }
  struct stat dst {};
  if (::fstat(f->direct_fd_, &dst) != 0 || dst.st_dev != st.st_dev || dst.st_ino != st.st_ino) {
    // The path now names another file (replaced meanwhile): never read from it.
    ::close(f->direct_fd_);
    f->direct_fd_ = -1;
    f->direct_note_ = "the path names another file than the open one: buffered reads";
    return f;
  }
  // Unaligned heads and tails go through the buffered descriptor; keep its readahead from
  // pulling in the neighbouring bytes that the O_DIRECT descriptor reads anyway.
  (void)::posix_fadvise(f->fd_, 0, 0, POSIX_FADV_RANDOM);
  return f;
}

FileHandle::~FileHandle() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (fd_ >= 0) ::close(fd_);
}

uint64_t FileHandle::current_size() const {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    throw IoError(err, "cannot stat: " + errno_text(err), path_);
  }
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace fastckpt

// An open file, shared by the Python object that opened it and every batch still reading it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace fastckpt {

class FileHandle {
 public:
  // Opens `path` read-only. With `want_direct`, also opens an O_DIRECT descriptor when the
  // filesystem accepts one and is backed by a device (not tmpfs/ramfs, where O_DIRECT would only
  // add alignment constraints). Throws IoError (errno + path) on failure. Only regular files are
  // accepted unless `allow_special` (a test hook: a directory gives real kernel read errors).
  static std::shared_ptr<FileHandle> open(const std::string& path, bool want_direct,
                                          bool allow_special = false);
  // Adopts a copy (dup) of an already-open descriptor of a regular file; `path` is only for
  // messages. The O_DIRECT descriptor, when wanted, is a fresh open of the same file through
  // /proc/self/fd, used only if it is the very same inode (else buffered reads, with a note).
  // The caller keeps `fd`. Throws IoError.
  static std::shared_ptr<FileHandle> adopt(int fd, const std::string& path, bool want_direct);
  ~FileHandle();
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;

  const std::string& path() const noexcept { return path_; }
  uint64_t size() const noexcept { return size_; }  // at open
  bool direct() const noexcept { return direct_fd_ >= 0; }
  int buffered_fd() const noexcept { return fd_; }
  int direct_fd() const noexcept { return direct_fd_; }
  // Why O_DIRECT is not in use ("" when it is or was not requested).
  const std::string& direct_note() const noexcept { return direct_note_; }
  // The size now (fstat); throws IoError.
  uint64_t current_size() const;

 private:
  FileHandle() = default;
  // Shared by open() and adopt(): fstat, regular-file check, fadvise, O_DIRECT descriptor.
  static std::shared_ptr<FileHandle> finish(std::shared_ptr<FileHandle> f, bool want_direct,
                                            bool allow_special, const std::string& direct_path);
  std::string path_;
  int fd_ = -1;
  int direct_fd_ = -1;
  uint64_t size_ = 0;
  std::string direct_note_;
};

}  // namespace fastckpt

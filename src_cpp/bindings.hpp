// Shared by the binding files (bindings.cpp, bindings_copy.cpp), the only files that include
// Python headers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "engine.hpp"
#include "file.hpp"

namespace fastckpt_py {

// The open file behind a fastckpt File (TypeError for anything else, ValueError when closed);
// `what` names the argument in messages.
std::shared_ptr<fastckpt::FileHandle> file_handle_of(const pybind11::handle& obj,
                                                     const std::string& what);
// The engine behind a fastckpt Engine (TypeError for anything else).
std::shared_ptr<fastckpt::EngineCore> engine_core_of(const pybind11::handle& obj);
// An int item of a request tuple (TypeError for bool or non-int, ValueError when negative and
// `non_negative`); `where` ("read 3") and `field` name it in messages.
int64_t int_arg(const pybind11::handle& h, const std::string& where, const char* field,
                bool non_negative);
// True while the interpreter shuts down (no GIL juggling then).
bool finalizing();

// Registers the copy pipeline's classes and functions (bindings_copy.cpp).
void bind_copy(pybind11::module_& m);

}  // namespace fastckpt_py

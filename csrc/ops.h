// Declarations of every op in peftkern._C. One op per source file.
#pragma once
#include <torch/extension.h>

#include <string>

namespace peftkern {

std::string build_info();

}  // namespace peftkern

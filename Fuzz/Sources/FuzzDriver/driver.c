// The declaration lives in the header; libFuzzer (linked by -sanitize=fuzzer) defines it.
#include "FuzzDriver.h"

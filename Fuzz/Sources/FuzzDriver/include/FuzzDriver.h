// libFuzzer's entry for programs that have their own main (SwiftPM gives every executable
// target one): run the fuzzing loop with `callback` as the target.
#ifndef IGRIS_FUZZ_DRIVER_H
#define IGRIS_FUZZ_DRIVER_H
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif

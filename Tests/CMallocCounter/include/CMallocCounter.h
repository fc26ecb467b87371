// Counts heap allocations made anywhere in the test process (malloc, calloc, realloc,
// posix_memalign, aligned_alloc, memalign), so a test can show that steady-state
// forwarding allocates nothing per operation. The test executable defines malloc & co.,
// which ELF symbol interposition makes every library (Swift runtime included) use.
#ifndef IGRIS_MALLOC_COUNTER_H
#define IGRIS_MALLOC_COUNTER_H
#include <stdint.h>

/// Allocations since the process started.
uint64_t igris_allocation_count(void);

/// Bytes the heap has handed out and not had back (mallinfo2's uordblks + hblkhd).
uint64_t igris_heap_in_use(void);

#endif

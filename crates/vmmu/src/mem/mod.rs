//! Guest memory, memslots, and the host memory model (filled in by the memory layer).

//! QEMU keyval syntax (in progress).

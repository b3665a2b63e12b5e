//! Host VM.

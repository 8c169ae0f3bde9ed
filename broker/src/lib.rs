//! ferrymq broker library.

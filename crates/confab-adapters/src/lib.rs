//! adapters.

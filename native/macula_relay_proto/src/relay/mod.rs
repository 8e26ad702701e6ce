//! The relay's tables, driven by the relay server's async glue.

pub mod admission;
pub mod router;
pub mod sessions;

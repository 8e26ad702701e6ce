//! The node's machines, driven by the node crate's async glue.

pub mod control;
pub mod cookie_pake;
pub mod direct;
pub mod direct_paths;
pub mod dist_route;
pub mod matcher;
pub mod paths;
pub mod relay_set;
pub mod session_auth;

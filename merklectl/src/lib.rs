//! `merklectl`, the Merkle Mesh command line, as a library: the integration tests reuse
//! [`stack`] to start real PostgreSQL, Redis and service processes the same way `merklectl up`
//! does.

pub mod cache;
pub mod local;
pub mod remote;
pub mod stack;
pub mod stored;
pub mod up;

//! The Contree v1 wire shapes the core accepts and produces: they live in `boxwood-types`,
//! shared with the clients, and are named here so the core's modules use them from one place.

pub use boxwood_types::*;

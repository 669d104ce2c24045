//! The Boxwood server as a library: configuration and the composition root, used by the
//! `boxwood` binary and by the end-to-end tests.

pub mod admin;
pub mod app;
pub mod config;
pub mod network;
pub mod remote;
pub mod state;

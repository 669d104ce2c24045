//! End-to-end tests: a real server, real QEMU microVMs (TCG), HTTP as the clients speak it.

mod api;
mod harness;
mod lifecycle;
mod runs;

//! End-to-end tests: a real server, real QEMU microVMs (TCG), HTTP as the clients speak it.

mod abuse_guest;
mod abuse_import;
mod abuse_inert;
mod abuse_inside;
mod abuse_jail;
mod abuse_network;
mod abuse_sizes;
mod abuse_sparse;
mod abuse_state;
mod api;
mod ca_certs;
mod disk_layer;
mod faults;
mod files;
mod harness;
mod images;
mod import;
mod inspect;
mod isolation;
mod lifecycle;
mod live;
mod metrics;
mod python;
mod retention;
mod runs;
mod stalls;

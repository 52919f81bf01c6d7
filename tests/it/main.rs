//! The integration tests, in one binary.

mod block_device;
mod cli;
mod copy_cli;
mod crash;
mod double_fault;
mod engine;
mod engine_crash;
mod export;
mod fuzz_corpus;
mod golden;
mod golden_v2;
mod medium;
mod model;
mod nbd;
mod nbd_client;
mod recovery_table;
mod remote;
mod resolve;
mod restart;
mod serve;
mod sim;
mod support;
mod tidy;
mod tls;

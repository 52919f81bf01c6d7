//! The integration tests, in one binary.

mod cli;
mod copy_cli;
mod crash;
mod engine;
mod engine_crash;
mod fuzz_corpus;
mod golden;
mod medium;
mod model;
mod nbd;
mod recovery_table;
mod resolve;
mod restart;
mod serve;
mod sim;
mod support;
mod tidy;

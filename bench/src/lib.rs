//! sluice-bench: a load generator for any KServe v2 / Triton gRPC inference server.
//!
//! The path of a run, one module per step:
//!
//! * [`cli`] and [`scenario`] turn flags or a TOML file into one [`config::RunSpec`];
//! * [`target`] opens the connections, [`inputs`] builds the request once, and
//!   [`priority`] its copies for each priority level of a mix;
//! * [`schedule`] says when open-loop requests are meant to be sent;
//! * [`load`] runs the workers of each point, which record into [`stats`], sending
//!   through [`wire`] (ModelInfer over HTTP/2 with the request encoded once);
//! * [`progress`] draws the live bar; [`report`] makes the table and JSON,
//!   [`plot`] the SVG/PNG plots; [`runner`] strings them together.

pub mod cli;
pub mod config;
pub mod inputs;
pub mod load;
pub mod plot;
pub mod priority;
pub mod progress;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod stats;
pub mod target;
pub mod wire;

//! biflow-core: all the maths and I/O of biflow. The Node shell (`biflow-node`) only forwards
//! `jobs::run(name, options, ctx)` calls here.
//!
//! The rooms, from the bottom up (ARCHITECTURE.md draws them): `io` and `data` (files and datasets),
//! `device` (where the maths runs), `kernels` (fused CPU ops with composed references), `models`
//! (F and G as candle modules), `engine` (hand-written CPU passes of those models), `run` (the run
//! folder and its samplers), `train` (the one trainer), `eval` (metrics), `jobs` (one file a command).

pub mod data;
pub mod device;
pub mod engines;
pub mod eval;
pub mod io;
pub mod job;
pub mod jobs;
pub mod models;
pub mod run;
pub mod train;

pub use job::{Cancelled, Event, JobCtx};

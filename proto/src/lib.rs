//! The listenscope wire protocol, generated from `proto/listenscope/v1/inventory.proto`.
//!
//! Only this crate, the agent's transport and the collector's gRPC service see these
//! types; everything else works on domain types (`listenscope_agent::record`), converted
//! and validated at that edge.

#![allow(missing_debug_implementations, clippy::all)] // generated code

/// `listenscope.v1`: messages, the `Inventory` client and server.
pub mod v1 {
    tonic::include_proto!("listenscope.v1");
}

/// Encoded `FileDescriptorSet` of `listenscope.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/listenscope_v1_descriptor.bin"));

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

/// The gRPC codec of the generated client and server: prost, with small initial buffers.
///
/// tonic's default buffers are 8 KiB per stream and direction, allocated for the life of
/// the stream. A collector holds one stream per agent (tens of thousands) and sends only
/// small replies, so its encode buffer starts at 1 KiB; buffers still grow to the largest
/// message a stream carries, which is why agents keep their messages under
/// `listenscope_core::limits::MESSAGE_TARGET_BYTES`.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial size and growth step of each stream's buffers.
    pub const BUFFER_BYTES: usize = 1024;
    /// An encoder yields to the transport once this much is buffered (tonic's default).
    const YIELD_BYTES: usize = 32 * 1024;

    /// [`ProstCodec`] with [`BUFFER_BYTES`] buffers.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Codec for LeanCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }
    }
}

/// Encoded `FileDescriptorSet` of `listenscope.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/listenscope_v1_descriptor.bin"));

//! Istio's certificate API (`istio.v1.auth.IstioCertificateService`), generated from
//! `istio/ca.proto` with the names and field numbers Istio publishes.
#![forbid(unsafe_code)]

/// `package istio.v1.auth`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod istio {
    /// `istio.v1`.
    pub mod v1 {
        /// `istio.v1.auth`.
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use istio::v1::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_client::IstioCertificateServiceClient,
    istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
};

//! Signing with a token key: recovery after the token drops the login, and many threads
//! signing at once through the session pool. Each test gets its own fresh token.

mod common;

use std::collections::HashSet;

use common::in_fresh_token;
use hsmca_hsm::{HsmSigner, KeyAlgorithm, Signer, SignerOptions};

fn sign_and_verify(signer: &HsmSigner, message: &[u8]) {
    let sig = signer
        .sign(message)
        .unwrap_or_else(|e| panic!("signing {:?}: {e}", String::from_utf8_lossy(message)));
    signer
        .public_key()
        .verify(signer.algorithm().signature_algorithm().oid, message, &sig)
        .unwrap_or_else(|e| panic!("verifying {:?}: {e}", String::from_utf8_lossy(message)));
}

#[test]
fn signing_recovers_after_logout() {
    in_fresh_token("signing_recovers_after_logout", |token, _| {
        for (label, algorithm, sessions) in [
            ("ec", KeyAlgorithm::EcdsaP256, 1),
            ("rsa", KeyAlgorithm::Rsa2048, 2),
        ] {
            token.generate_key(label, algorithm).unwrap();
            let options = SignerOptions {
                sessions,
                allow_insecure_key: false,
            };
            let signer = HsmSigner::open(token.clone(), label, &options).unwrap();
            sign_and_verify(&signer, format!("{label}: before logout").as_bytes());
            for round in 0..3 {
                // The token logs the whole application out: every pooled session loses its
                // login, and the next C_Sign fails with CKR_USER_NOT_LOGGED_IN.
                token.logout().unwrap();
                sign_and_verify(&signer, format!("{label}: after logout {round}").as_bytes());
                sign_and_verify(&signer, format!("{label}: and again {round}").as_bytes());
            }
        }
    });
}

#[test]
fn many_threads_sign_at_once() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 200;
    in_fresh_token("many_threads_sign_at_once", |token, _| {
        token.generate_key("ca", KeyAlgorithm::EcdsaP256).unwrap();
        let options = SignerOptions {
            sessions: 4,
            allow_insecure_key: false,
        };
        let signer = HsmSigner::open(token.clone(), "ca", &options).unwrap();
        assert_eq!(signer.sessions(), 4);
        let results: Vec<(Vec<u8>, Vec<u8>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let signer = &signer;
                    scope.spawn(move || {
                        (0..PER_THREAD)
                            .map(|i| {
                                let message = format!("thread {t} message {i}").into_bytes();
                                let sig = signer
                                    .sign(&message)
                                    .unwrap_or_else(|e| panic!("thread {t} signature {i}: {e}"));
                                (message, sig)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a signing thread panicked"))
                .collect()
        });
        assert_eq!(results.len(), THREADS * PER_THREAD);
        let distinct: HashSet<_> = results.iter().map(|(m, _)| m.clone()).collect();
        assert_eq!(
            distinct.len(),
            THREADS * PER_THREAD,
            "messages are distinct"
        );
        let oid = KeyAlgorithm::EcdsaP256.signature_algorithm().oid;
        let public = token.public_key("ca").unwrap();
        for (message, sig) in &results {
            public.verify(oid, message, sig).unwrap_or_else(|e| {
                panic!(
                    "signature over {:?} does not verify: {e}",
                    String::from_utf8_lossy(message)
                )
            });
        }
        // A signature belongs to its own message only.
        let (m0, _) = &results[0];
        let (_, s1) = &results[1];
        assert!(public.verify(oid, m0, s1).is_err());
    });
}

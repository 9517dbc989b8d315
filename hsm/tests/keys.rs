//! CA keys in a real token (SoftHSM2): generation, protection attributes, and refusal of keys
//! that are or were extractable. Each test gets its own fresh token (see `common`).

mod common;

use std::process::Command;

use common::{have_tool, in_fresh_token, pkcs11_tool, pkcs11_tool_access, read_value, run, run_ok};
use hsmca_hsm::{Error, HsmSigner, KeyAlgorithm, PublicKey, Signer, SignerOptions};

fn strict() -> SignerOptions {
    SignerOptions {
        sessions: 1,
        allow_insecure_key: false,
    }
}

fn insecure_allowed() -> SignerOptions {
    SignerOptions {
        sessions: 1,
        allow_insecure_key: true,
    }
}

/// Checks `sig` over `message` with `key`, and that a changed message or signature fails.
fn assert_verifies(key: &PublicKey, algorithm: KeyAlgorithm, message: &[u8], sig: &[u8]) {
    let oid = algorithm.signature_algorithm().oid;
    key.verify(oid, message, sig)
        .unwrap_or_else(|e| panic!("{algorithm}: signature does not verify: {e}"));
    let mut changed = message.to_vec();
    changed[0] ^= 0x01;
    assert!(
        key.verify(oid, &changed, sig).is_err(),
        "{algorithm}: signature verifies over a different message"
    );
    let mut bad_sig = sig.to_vec();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x01;
    assert!(
        key.verify(oid, message, &bad_sig).is_err(),
        "{algorithm}: a corrupted signature verifies"
    );
}

/// Verifies the signature with openssl, an implementation independent of this crate.
fn assert_openssl_verifies(key: &PublicKey, algorithm: KeyAlgorithm, message: &[u8], sig: &[u8]) {
    if !have_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pubkey, msg, sig_file, bad) = (
        dir.path().join("pub.der"),
        dir.path().join("msg"),
        dir.path().join("sig"),
        dir.path().join("bad"),
    );
    std::fs::write(&pubkey, key.spki_der()).unwrap();
    std::fs::write(&msg, message).unwrap();
    std::fs::write(&sig_file, sig).unwrap();
    let mut changed = message.to_vec();
    changed[0] ^= 0x01;
    std::fs::write(&bad, &changed).unwrap();
    let digest = match algorithm {
        KeyAlgorithm::EcdsaP384 => "-sha384",
        _ => "-sha256",
    };
    let verify = |file: &std::path::Path| {
        run(Command::new("openssl")
            .args(["dgst", digest, "-keyform", "DER", "-verify"])
            .arg(&pubkey)
            .arg("-signature")
            .arg(&sig_file)
            .arg(file))
    };
    let good = verify(&msg);
    assert!(
        good.status.success() && String::from_utf8_lossy(&good.stdout).contains("Verified OK"),
        "{algorithm}: openssl does not verify the token's signature"
    );
    assert!(
        !verify(&bad).status.success(),
        "{algorithm}: openssl verifies the signature over a different message"
    );
}

#[test]
fn generates_protected_keys_of_every_algorithm() {
    in_fresh_token("generates_protected_keys_of_every_algorithm", |token, _| {
        for algorithm in KeyAlgorithm::ALL {
            let label = format!("ca-{algorithm}");
            let generated = token.generate_key(&label, algorithm).unwrap();
            assert_eq!(generated.label, label);
            assert_eq!(generated.algorithm, Some(algorithm));
            assert_eq!(generated.id.len(), 16, "CKA_ID is 16 random bytes");

            // Read back from the token, not from what generate_key returned.
            let info = token.key_info(&label).unwrap();
            let s = &info.security;
            assert!(s.sensitive, "{algorithm}: CKA_SENSITIVE");
            assert!(!s.extractable, "{algorithm}: CKA_EXTRACTABLE");
            assert!(s.always_sensitive, "{algorithm}: CKA_ALWAYS_SENSITIVE");
            assert!(s.never_extractable, "{algorithm}: CKA_NEVER_EXTRACTABLE");
            assert!(
                s.token && s.private && s.sign && s.local,
                "{algorithm}: {s:?}"
            );
            assert!(!s.decrypt && !s.unwrap && !s.derive, "{algorithm}: {s:?}");
            assert!(s.problems().is_empty(), "{algorithm}: {:?}", s.problems());
            assert_eq!(info.id, generated.id);

            let public = token.public_key(&label).unwrap();
            assert_eq!(public.algorithm(), Some(algorithm));
            assert_eq!(public.type_name(), algorithm.name());
            assert_eq!(public.is_rsa(), !algorithm.is_ec());
            assert_eq!(Some(&public), generated.public_key.as_ref());
            // The SPKI round-trips through the decoder.
            assert_eq!(PublicKey::from_spki_der(public.spki_der()).unwrap(), public);

            let signer = HsmSigner::open(token.clone(), &label, &strict()).unwrap();
            assert_eq!(signer.algorithm(), algorithm);
            assert_eq!(signer.public_key(), &public);
            let message = format!("to be signed by {label}").into_bytes();
            let sig = signer.sign(&message).unwrap();
            match algorithm.rsa_bits() {
                Some(bits) => assert_eq!(sig.len() as u64 * 8, bits, "RSA signature size"),
                None => assert_eq!(sig[0], 0x30, "ECDSA signature is a DER SEQUENCE"),
            }
            assert_verifies(&public, algorithm, &message, &sig);
            assert_openssl_verifies(&public, algorithm, &message, &sig);
        }
        let listed: Vec<_> = token
            .list_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.label)
            .collect();
        let mut expected: Vec<_> = KeyAlgorithm::ALL
            .iter()
            .map(|a| format!("ca-{a}"))
            .collect();
        expected.sort();
        assert_eq!(listed, expected);
    });
}

#[test]
fn refuses_to_generate_under_an_existing_label() {
    in_fresh_token("refuses_to_generate_under_an_existing_label", |token, _| {
        let first = token.generate_key("ca", KeyAlgorithm::EcdsaP256).unwrap();
        for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384] {
            match token.generate_key("ca", algorithm) {
                Err(Error::LabelExists(label)) => assert_eq!(label, "ca"),
                other => panic!("second key labelled \"ca\" ({algorithm}): {other:?}"),
            }
        }
        // The first key is untouched and still the only one.
        let keys = token.list_keys().unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys[0].id, first.id);
        assert_eq!(
            token.public_key("ca").unwrap(),
            first.public_key.clone().unwrap()
        );
        // Another label is fine.
        token.generate_key("ca-2", KeyAlgorithm::EcdsaP256).unwrap();
        assert_eq!(token.list_keys().unwrap().len(), 2);
    });
}

#[test]
fn private_key_value_cannot_be_read() {
    in_fresh_token("private_key_value_cannot_be_read", |token, module| {
        token
            .generate_key("ca-ec", KeyAlgorithm::EcdsaP256)
            .unwrap();
        token.generate_key("ca-rsa", KeyAlgorithm::Rsa2048).unwrap();

        if have_tool("pkcs11-tool") {
            for label in ["ca-ec", "ca-rsa"] {
                let out_dir = tempfile::tempdir().unwrap();
                let out_file = out_dir.path().join("key.der");
                let out = run(pkcs11_tool(module)
                    .args(["--read-object", "--type", "privkey", "--label", label])
                    .arg("--output-file")
                    .arg(&out_file));
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                // OpenSC 0.23 cannot read private keys at all and exits 0 after saying so;
                // later versions try CKA_VALUE and fail. Either way no key may come out.
                assert!(
                    !out.status.success() || text.contains("reading private keys not"),
                    "pkcs11-tool --read-object of {label} succeeded:\n{text}"
                );
                let written = std::fs::read(&out_file).unwrap_or_default();
                assert!(written.is_empty(), "pkcs11-tool wrote {label}'s key out");

                let access = pkcs11_tool_access(module, label);
                assert!(
                    access.starts_with("sensitive, always sensitive, never extractable"),
                    "pkcs11-tool shows {label} as {access:?}"
                );
            }
        }

        if have_tool("python3") {
            // A second PKCS#11 client asks the token for CKA_VALUE / CKA_PRIVATE_EXPONENT.
            for label in ["ca-ec", "ca-rsa"] {
                let out = read_value(module, &[], label);
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert_eq!(
                    out.status.code(),
                    Some(3),
                    "reading the secret of {label}: {stdout}"
                );
                assert!(
                    stdout.contains("rv 0x11"),
                    "expected CKR_ATTRIBUTE_SENSITIVE for {label}: {stdout}"
                );
            }
            // Control: the same client does read the value of a key that is not sensitive.
            let out = read_value(module, &["--create-readable-ec-key"], "readable");
            assert!(out.status.success(), "creating the readable control key");
            let out = read_value(module, &[], "readable");
            assert_eq!(
                out.status.code(),
                Some(0),
                "the control key must be readable"
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains("private CKA_VALUE ok 32"));
            if have_tool("pkcs11-tool") {
                let access = pkcs11_tool_access(module, "readable");
                assert!(
                    !access.contains("never extractable"),
                    "control key shown as {access:?}"
                );
            }
        }
    });
}

#[test]
fn refuses_extractable_and_imported_keys() {
    in_fresh_token("refuses_extractable_and_imported_keys", |token, module| {
        // A properly generated key opens: the refusals below are about the keys, not the token.
        token.generate_key("good", KeyAlgorithm::EcdsaP256).unwrap();
        HsmSigner::open(token.clone(), "good", &strict()).unwrap();

        let mut insecure: Vec<(&str, &str)> = Vec::new();
        if have_tool("pkcs11-tool") {
            // Generated in the token, but marked extractable.
            run_ok(pkcs11_tool(module).args([
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                "extractable",
                "--id",
                "e1",
                "--usage-sign",
                "--extractable",
            ]));
            insecure.push(("extractable", "CKA_EXTRACTABLE"));
        }
        let mut imported_spki = None;
        if have_tool("pkcs11-tool") && have_tool("openssl") {
            // Made outside the token with openssl and imported.
            let dir = tempfile::tempdir().unwrap();
            let (pem, key_der, pub_der) = (
                dir.path().join("key.pem"),
                dir.path().join("key.der"),
                dir.path().join("pub.der"),
            );
            run_ok(
                Command::new("openssl")
                    .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                    .arg("ec_paramgen_curve:P-256")
                    .arg("-out")
                    .arg(&pem),
            );
            run_ok(
                Command::new("openssl")
                    .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
                    .arg(&pem)
                    .arg("-out")
                    .arg(&key_der),
            );
            run_ok(
                Command::new("openssl")
                    .args(["pkey", "-pubout", "-outform", "DER", "-in"])
                    .arg(&pem)
                    .arg("-out")
                    .arg(&pub_der),
            );
            for (file, kind) in [(&key_der, "privkey"), (&pub_der, "pubkey")] {
                run_ok(
                    pkcs11_tool(module)
                        .arg("--write-object")
                        .arg(file)
                        .args(["--type", kind, "--label", "imported", "--id", "a1"])
                        .args(["--usage-sign", "--sensitive"]),
                );
            }
            imported_spki = Some(std::fs::read(&pub_der).unwrap());
            insecure.push(("imported", "CKA_ALWAYS_SENSITIVE"));
        }
        if have_tool("python3") {
            // Created from a known value, readable and extractable.
            let out = read_value(module, &["--create-readable-ec-key"], "readable");
            assert!(out.status.success(), "creating the readable key");
            insecure.push(("readable", "CKA_SENSITIVE"));
        }

        for (label, attribute) in &insecure {
            let info = token.key_info(label).unwrap();
            assert!(
                !info.security.never_extractable,
                "{label}: token reports CKA_NEVER_EXTRACTABLE: {:?}",
                info.security
            );
            assert!(!info.security.problems().is_empty());
            match HsmSigner::open(token.clone(), label, &strict()) {
                Err(Error::InsecureKey { label: l, reason }) => {
                    assert_eq!(l, *label);
                    assert!(reason.contains(attribute), "{label}: reason {reason:?}");
                }
                other => panic!("{label}: HsmSigner::open gave {other:?}, not InsecureKey"),
            }
            // The override opens it, and it signs.
            let signer = HsmSigner::open(token.clone(), label, &insecure_allowed())
                .unwrap_or_else(|e| panic!("{label} with allow_insecure_key: {e}"));
            let message = format!("signed by the insecure key {label}").into_bytes();
            let sig = signer.sign(&message).unwrap();
            assert_verifies(signer.public_key(), KeyAlgorithm::EcdsaP256, &message, &sig);
        }
        if let Some(spki) = imported_spki {
            assert_eq!(token.public_key("imported").unwrap().spki_der(), spki);
        }
    });
}

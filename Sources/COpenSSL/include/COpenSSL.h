// COpenSSL: OpenSSL 3 (libssl, libcrypto) for IgrisTLS — the headers, plus functions for what
// Swift cannot call as is (macros, callbacks) and the few multi-step jobs done once per
// context or handshake (ticket-key rotation, CRL loading, a peer certificate's name), and TLS
// 1.3's key schedule as a provider of our own (keyschedule.c).
#ifndef IGRIS_COPENSSL_H
#define IGRIS_COPENSSL_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/pem.h>
#include <openssl/kdf.h>
#include <openssl/provider.h>
#include <stddef.h>

static inline long igris_ssl_ctx_set_min_version(SSL_CTX *ctx, int version) { return SSL_CTX_set_min_proto_version(ctx, version); }
static inline long igris_ssl_ctx_set_max_version(SSL_CTX *ctx, int version) { return SSL_CTX_set_max_proto_version(ctx, version); }
static inline long igris_ssl_ctx_set_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_mode(ctx, mode); }
static inline long igris_ssl_ctx_set_groups(SSL_CTX *ctx, const char *groups) { return SSL_CTX_set1_groups_list(ctx, groups); }
static inline long igris_ssl_ctx_set_session_cache_mode(SSL_CTX *ctx, long mode) { return SSL_CTX_set_session_cache_mode(ctx, mode); }
static inline long igris_ssl_set_host_name(SSL *ssl, const char *name) { return SSL_set_tlsext_host_name(ssl, name); }
static inline long igris_bio_mem_data(BIO *bio, char **data) { return BIO_get_mem_data(bio, data); }
static inline int igris_err_reason(unsigned long e) { return ERR_GET_REASON(e); }
static inline int igris_err_library(unsigned long e) { return ERR_GET_LIB(e); }

/// No renegotiation, no compression, the server's cipher order.
static inline uint64_t igris_ssl_default_options(void) { return SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE; }
/// The peer's certificate must hold this IP address (client side).
static inline int igris_ssl_expect_ip(SSL *ssl, const char *ip) { return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), ip); }

/// TLS versions and modes, as plain ints (the macros are not imported).
static inline int igris_tls1_2_version(void) { return TLS1_2_VERSION; }
static inline int igris_tls1_3_version(void) { return TLS1_3_VERSION; }
static inline long igris_mode_release_buffers(void) { return SSL_MODE_RELEASE_BUFFERS; }
static inline long igris_mode_partial_write(void) { return SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER; }

/// SNI: `callback(ssl, arg)` returns 0 to go on (the context may have been switched with
/// SSL_set_SSL_CTX), 1 to refuse the handshake with an unrecognized_name alert.
typedef int (*igris_sni_callback)(SSL *ssl, void *arg);
void igris_ssl_ctx_set_sni(SSL_CTX *ctx, igris_sni_callback callback, void *arg);

/// ALPN (server): picks the first of the client's protocols that `wire` (length-prefixed, the
/// server's preference order) lists; no overlap → no_application_protocol alert. `wire`
/// must outlive the context.
void igris_ssl_ctx_set_alpn_select(SSL_CTX *ctx, const unsigned char *wire, unsigned length);

/// Session tickets under keys this process makes and rotates: a new key every
/// `rotate_seconds`, the previous one still accepted (renewed on use) for another period.
/// Returns 0 on success.
int igris_ssl_ctx_rotate_ticket_keys(SSL_CTX *ctx, unsigned rotate_seconds);

/// Client side: remembers the newest session (ticket) the context's connections were given,
/// and `igris_ssl_resume` offers it on a new connection. Returns 0 on success.
int igris_ssl_ctx_remember_sessions(SSL_CTX *ctx);
void igris_ssl_resume(SSL *ssl);

/// Adds the CRLs in a PEM file to the context's store and turns CRL checking on for the
/// leaf. The count loaded, or -1 (reason on the error queue).
int igris_ssl_ctx_load_crl(SSL_CTX *ctx, const char *path);

/// The verified peer certificate's name: its subject CN (`use_san` 0), or its first DNS,
/// e-mail or URI subjectAltName (1). Length written (NUL-terminated), or -1 without one.
int igris_ssl_peer_name(SSL *ssl, int use_san, char *out, size_t capacity);

/// A certificate file's first certificate: seconds until notAfter (negative: expired), and
/// whether it parsed at all (0 on success, -1 not found / not PEM).
int igris_certificate_expiry(const char *path, long long *seconds_left);

/// A read-only BIO over caller memory (`igris_input_bio_set`): OpenSSL reads the ciphertext
/// where the engine received it, with no copy into a memory BIO. Empty: "retry".
BIO *igris_input_bio_new(void);
void igris_input_bio_set(BIO *bio, const void *data, size_t length);
size_t igris_input_bio_left(BIO *bio);

// MARK: - TLS 1.3's key schedule (keyschedule.c)

/// A context (server or client method) whose TLS 1.3 key schedule is IGRIS's own provider's,
/// where OpenSSL took it (else OpenSSL's). NULL when OpenSSL could not make one.
SSL_CTX *igris_ssl_ctx_new(int server);
/// Keeps the TLS 1.3 application traffic secrets of the context's connections (in the SSL's
/// own ex_data, freed with it), for the record layer and kTLS. Only contexts that key either
/// turn this on. 0 on success; without the provider, nothing is kept and OpenSSL carries
/// the records.
int igris_ssl_ctx_capture_traffic_secrets(SSL_CTX *ctx);
/// SSL_do_handshake, with the connection known to the key schedule while it runs.
int igris_ssl_do_handshake(SSL *ssl);

// MARK: - Kernel TLS hand-off (TLS 1.3)

/// The negotiated TLS 1.3 cipher's traffic keys for one direction (`sending`: this side's
/// records, else the peer's), derived from the captured secret with HKDF-Expand-Label:
/// `key` (16 or 32 bytes, `*key_length` set) and the 12-byte `iv`. The kernel's cipher
/// (TLS_CIPHER_*) is returned, or -1: not TLS 1.3, no secret captured, or a cipher the kernel
/// path doesn't take.
int igris_tls13_traffic_keys(SSL *ssl, int sending, unsigned char key[32], size_t *key_length, unsigned char iv[12]);

/// Hands one direction of `fd` to the kernel (`setsockopt(SOL_TLS, TLS_TX or TLS_RX)`; the
/// `tls` ULP must be attached, `igris_ktls_attach`): 0, or -errno.
int igris_ktls_install(int fd, int transmit, int cipher, const unsigned char *key, size_t key_length,
                       const unsigned char iv[12], unsigned long long sequence);
/// `setsockopt(IPPROTO_TCP, TCP_ULP, "tls")`: 0, or -errno.
int igris_ktls_attach(int fd);

/// The negotiated TLS 1.3 cipher suite: its kernel cipher (TLS_CIPHER_*) is returned, with
/// its HKDF digest ("SHA256"…), key length and hash (secret) length; -1 for another version
/// or suite.
int igris_tls13_suite(SSL *ssl, const char **digest, size_t *key_length, size_t *hash_length);
/// The captured application traffic secret of one direction (`sending`: this side's): 0, or
/// -1 when there is none (not TLS 1.3, not captured).
int igris_tls13_traffic_secret(SSL *ssl, int sending, unsigned char secret[64], size_t *secret_length);
/// HKDF-Expand-Label(secret, label, "", length) of RFC 8446 §7.1 with `digest` ("SHA256" or "SHA384"), `length` at most the
/// digest's size (every TLS 1.3 key, IV and next secret is): 1 or 0.
int igris_expand_label(const char *digest, const unsigned char *secret, size_t secret_length, const char *label,
                       unsigned char *out, size_t length);

/// The connection's session holds a ticket (a TLS 1.3 client received one): 1, else 0.
int igris_ssl_has_ticket(SSL *ssl);

// MARK: - TLS 1.3 records without OpenSSL's SSL (records.c)

/// The most plaintext one record carries, and the most ciphertext one may have (RFC 8446 §5.2).
#define IGRIS_RECORD_PLAINTEXT 16384
#define IGRIS_RECORD_CIPHERTEXT (16384 + 256)

/// Both directions' record protection, keyed from a finished TLS 1.3 handshake's captured
/// traffic secrets: `sent` records have gone out under ours, `received` come in under the
/// peer's. NULL: not TLS 1.3, no secret captured, or another cipher suite.
struct igris_records;
struct igris_records *igris_records_new(SSL *ssl, unsigned long long sent, unsigned long long received);
void igris_records_free(struct igris_records *records);
/// One record of inner content `type` around `length` (≤ IGRIS_RECORD_PLAINTEXT) bytes, into
/// `out` (length + 22 bytes): its size, or -1.
long igris_records_seal(struct igris_records *records, int type, const unsigned char *plaintext, size_t length, unsigned char *out);
/// Opens the whole record at `record` (header included) into `out` (not overlapping it, as
/// long as its body): the content's length with its type in `*type`; -1 when it does not
/// authenticate (bad_record_mac), -2 when it has no content type (unexpected_message).
long igris_records_open(struct igris_records *records, const unsigned char *record, size_t length, unsigned char *out, int *type);
/// KeyUpdate: the next traffic secret, key and IV for one direction (`sending`: ours). 0 or -1.
int igris_records_update(struct igris_records *records, int sending);

/// Test support: decrypts one TLS 1.3 record (header included) with a direction's key, IV
/// and sequence number, as the kernel would. The inner plaintext's length (content type
/// stripped, in `*type`), or -1 when it does not authenticate.
long igris_tls13_open_record(int cipher, const unsigned char *key, size_t key_length, const unsigned char iv[12],
                             unsigned long long sequence, const unsigned char *record, size_t length,
                             unsigned char *out, int *type);

#endif

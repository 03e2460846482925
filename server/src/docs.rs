//! The headers of `/docs`, the Swagger UI page poem-openapi serves.
//!
//! The page is one static HTML document built once at start-up: an inline `<style>` (Swagger
//! UI's style sheet), an inline `<script>` (its bundle) and a second inline `<script>` that
//! starts it on the embedded OpenAPI document. It loads nothing else: no CDN, no fonts; its
//! icons are `data:` images in the style sheet, and "Try it out" calls this server.
//!
//! So the policy allows exactly those three blocks by their SHA-256 hashes, and no
//! `'unsafe-inline'` or `'unsafe-eval'` at all: an injected script or style element does
//! not run. The styles Swagger UI sets at run time go through the DOM's style objects,
//! which a policy does not restrict. The page may not be framed (`frame-ancestors 'none'`,
//! and `X-Frame-Options: DENY` for browsers that predate it), and it sends no `Referer`.
//! The OAuth2 redirect page Swagger UI also ships (`/docs/oauth-receiver.html`) gets the
//! same policy and stays inert: Trellis documents bearer tokens only.

use base64::Engine as _;
use poem::{Endpoint, EndpointExt as _, http::header, middleware::SetHeader};
use sha2::Digest as _;

/// `endpoint` (the Swagger UI routes) with the page's security headers.
pub fn with_security_headers<E: Endpoint + 'static>(
    endpoint: E,
    html: &str,
) -> impl Endpoint + use<E> {
    endpoint.with(
        SetHeader::new()
            .overriding(header::CONTENT_SECURITY_POLICY, policy(html))
            .overriding(header::X_FRAME_OPTIONS, "DENY")
            .overriding(header::REFERRER_POLICY, "no-referrer"),
    )
}

/// The Content-Security-Policy that lets `html`'s own inline blocks run, and nothing else.
fn policy(html: &str) -> String {
    let hashes = |tag: &str| {
        inline_blocks(html, tag)
            .map(|block| {
                let digest = sha2::Sha256::digest(block.as_bytes());
                let digest = base64::engine::general_purpose::STANDARD.encode(digest);
                format!(" 'sha256-{digest}'")
            })
            .collect::<String>()
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; img-src 'self' data:; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        hashes("script"),
        hashes("style"),
    )
}

/// The text of each `<tag …>…</tag>` in `html`, as the browser hashes it: from after the
/// opening tag's `>` to the first closing tag.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)?;
        let after = &rest[start..];
        let body = &after[after.find('>')? + 1..];
        let end = body.find(&close)?;
        rest = &body[end + close.len()..];
        Some(&body[..end])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inline_block_is_allowed_by_its_hash_and_nothing_inline_else() {
        let html = "<html><head><style a=\"1\">p{}</style><script>one()</script></head>\
                    <body><script>two()</script></body></html>";
        let blocks: Vec<_> = inline_blocks(html, "script").collect();
        assert_eq!(blocks, ["one()", "two()"]);
        let csp = policy(html);
        // printf 'one()' | openssl dgst -sha256 -binary | base64
        assert!(
            csp.contains("'sha256-HR7iaask9daLMRRskMI++QeJtjWDOjyPA6lGzYGzKW4='"),
            "{csp}"
        );
        assert_eq!(csp.matches("'sha256-").count(), 3, "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    }
}

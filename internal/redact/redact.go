// Package redact keeps secrets out of logs and error messages: the
// credentials in URLs (NATS URLs, ClickHouse DSNs, notification URLs) and
// the secret values of a configuration (API keys, webhook and notification
// secrets), wherever they turn up in a string.
package redact

import (
	"context"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
)

// Mask replaces what is redacted.
const Mask = "xxxxx"

// MinSecretLen is the length below which a value is not redacted
// everywhere it appears: a short one would garble unrelated text.
const MinSecretLen = 8

// userinfo matches the scheme and user information of a URL in any text;
// the user information ends at the last @ before the host, and may hold
// characters a URL parser would reject.
var userinfo = regexp.MustCompile(`([A-Za-z][A-Za-z0-9+.-]*://)[^\s"'@]*@`)

// Userinfo replaces the user information (user:password@) of every URL in
// s with the mask.
func Userinfo(s string) string {
	if !strings.Contains(s, "@") {
		return s
	}
	return userinfo.ReplaceAllString(s, "${1}"+Mask+"@")
}

// Origin returns scheme://host of the URL raw: what a log line may say
// about a URL whose path or query can hold a token (a chat webhook).
func Origin(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "(unparseable URL)"
	}
	return u.Scheme + "://" + u.Host
}

// Password returns the password of the user information of the URL raw,
// "" when it has none or cannot be parsed.
func Password(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return ""
	}
	p, _ := u.User.Password()
	return p
}

// Redactor removes the user information of URLs and a set of secret values
// from text. The zero value removes user information only.
type Redactor struct {
	r *strings.Replacer
}

// New returns a Redactor of secrets; values shorter than MinSecretLen are
// left alone (URL user information is removed whatever its length).
func New(secrets ...string) *Redactor {
	var pairs []string
	for _, s := range secrets {
		if len(s) >= MinSecretLen {
			pairs = append(pairs, s, Mask)
		}
	}
	if len(pairs) == 0 {
		return &Redactor{}
	}
	return &Redactor{r: strings.NewReplacer(pairs...)}
}

// String returns s without URL user information and secrets.
func (r *Redactor) String(s string) string {
	s = Userinfo(s)
	if r.r != nil {
		s = r.r.Replace(s)
	}
	return s
}

// Error returns err with a redacted message; errors.Is and errors.As still
// see the original chain. nil stays nil.
func (r *Redactor) Error(err error) error {
	if err == nil {
		return nil
	}
	return redactedError{msg: r.String(err.Error()), err: err}
}

type redactedError struct {
	msg string
	err error
}

func (e redactedError) Error() string { return e.msg }
func (e redactedError) Unwrap() error { return e.err }

// Handler returns a slog.Handler that redacts the message and every string,
// error and other value of a record before h sees it.
func (r *Redactor) Handler(h slog.Handler) slog.Handler {
	return &handler{h: h, r: r}
}

type handler struct {
	h slog.Handler
	r *Redactor
}

func (h *handler) Enabled(ctx context.Context, l slog.Level) bool { return h.h.Enabled(ctx, l) }

func (h *handler) Handle(ctx context.Context, rec slog.Record) error {
	out := slog.NewRecord(rec.Time, rec.Level, h.r.String(rec.Message), rec.PC)
	rec.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(h.attr(a))
		return true
	})
	return h.h.Handle(ctx, out)
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	red := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		red[i] = h.attr(a)
	}
	return &handler{h: h.h.WithAttrs(red), r: h.r}
}

func (h *handler) WithGroup(name string) slog.Handler {
	return &handler{h: h.h.WithGroup(name), r: h.r}
}

// attr redacts a's value: strings, errors and any other value whose text
// holds a secret; numbers, times and durations hold none.
func (h *handler) attr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(a.Key, h.r.String(v.String()))
	case slog.KindGroup:
		attrs := v.Group()
		red := make([]slog.Attr, len(attrs))
		for i, g := range attrs {
			red[i] = h.attr(g)
		}
		return slog.Attr{Key: a.Key, Value: slog.GroupValue(red...)}
	case slog.KindAny:
		if err, ok := v.Any().(error); ok {
			return slog.Any(a.Key, h.r.Error(err))
		}
		// Kept as it is (a JSON array stays one) unless its text holds a
		// secret.
		if text := v.String(); h.r.String(text) != text {
			return slog.String(a.Key, h.r.String(text))
		}
		return slog.Attr{Key: a.Key, Value: v}
	default:
		return slog.Attr{Key: a.Key, Value: v}
	}
}

module paynotify.dev/bench/gopay-peer

go 1.26.0

require (
	github.com/go-pay/crypto v0.0.3
	github.com/go-pay/gopay v1.5.123
)

require (
	github.com/go-pay/errgroup v0.0.3 // indirect
	github.com/go-pay/smap v0.0.2 // indirect
	github.com/go-pay/util v0.0.4 // indirect
	github.com/go-pay/xlog v0.0.3 // indirect
	github.com/go-pay/xtime v0.0.2 // indirect
	golang.org/x/crypto v0.53.0 // indirect
)

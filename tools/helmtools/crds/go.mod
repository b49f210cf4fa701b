// Not built: pins (with go.sum) the modules whose CustomResourceDefinitions the chart tests
// install into the test apiserver before a server-side dry-run of the rendered chart:
// ServiceMonitor and PrometheusRule from prometheus-operator, HTTPRoute from the Gateway
// API. scripts/helmtools.sh downloads them with `go mod download` (checked against go.sum).
module paynotify-helmtools/crds

go 1.26.0

require (
	github.com/prometheus-operator/prometheus-operator v0.85.0
	sigs.k8s.io/gateway-api v1.6.3
)

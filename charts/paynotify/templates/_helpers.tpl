{{/* Object name prefix: <release>-paynotify, or the release name when it already contains the chart name. */}}
{{- define "paynotify.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "paynotify.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "paynotify.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "paynotify.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: paynotify
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include "paynotify.selectorLabels" (list . "ingress") */}}
{{- define "paynotify.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "paynotify.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels of one component's objects. */}}
{{- define "paynotify.componentLabels" -}}
{{ include "paynotify.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "paynotify.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "paynotify.controllerServiceAccount" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "paynotify.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "paynotify.ingressServiceAccount" -}}
{{- if .Values.ingress.serviceAccount.create -}}
{{- default (printf "%s-ingress" (include "paynotify.fullname" .)) .Values.ingress.serviceAccount.name -}}
{{- else -}}
{{- required "ingress.serviceAccount.name is required when ingress.serviceAccount.create is false" .Values.ingress.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ingress's replica count: exactly one with the embedded store (a file on a ReadWriteOnce volume). */}}
{{- define "paynotify.ingressReplicas" -}}
{{- if eq .Values.store.type "embedded" -}}
1
{{- else -}}
{{- .Values.ingress.replicas -}}
{{- end -}}
{{- end -}}

{{- define "paynotify.pvcName" -}}
{{- default (printf "%s-store" (include "paynotify.fullname" .)) .Values.store.embedded.persistence.existingClaim -}}
{{- end -}}

{{/* Checks of value combinations that the schema cannot express. */}}
{{- define "paynotify.validate" -}}
{{- if and (eq .Values.store.type "embedded") .Values.ingress.autoscaling.enabled -}}
{{- fail "ingress.autoscaling.enabled needs store.type nats or none: the embedded store runs exactly one ingress replica" -}}
{{- end -}}
{{- if and (eq .Values.store.type "nats") (not .Values.store.nats.url) -}}
{{- fail "store.nats.url is required with store.type nats" -}}
{{- end -}}
{{- if and .Values.ingress.autoscaling.enabled (gt (int .Values.ingress.autoscaling.minReplicas) (int .Values.ingress.autoscaling.maxReplicas)) -}}
{{- fail "ingress.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* A soft topology spread over nodes for one component: include "paynotify.topologySpread" (list . "ingress" .Values.ingress.topologySpread) */}}
{{- define "paynotify.topologySpread" -}}
{{- $spread := index . 2 -}}
{{- if $spread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ $spread.topologyKey }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "paynotify.selectorLabels" (list (index . 0) (index . 1)) | nindent 8 }}
{{- end }}
{{- end -}}

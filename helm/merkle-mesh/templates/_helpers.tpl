{{/* Labels shared by every object of a service. */}}
{{- define "merkle-mesh.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: merkle-mesh
app.kubernetes.io/instance: {{ .release }}
app.kubernetes.io/version: {{ .version | quote }}
{{- end -}}

{{/* The labels that select a service's pods: (dict "name" NAME "release" RELEASE). */}}
{{- define "merkle-mesh.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .release }}
{{- end -}}

{{/* Whether a service's pods use the Kubernetes API (only Discovery's Kubernetes backend). */}}
{{- define "merkle-mesh.usesApi" -}}
{{- if and (eq .name "discovery") (eq .root.Values.discovery.backend "kubernetes") }}true{{- end -}}
{{- end -}}

{{/* The replica count a service runs with: its HPA's minimum when one owns it. */}}
{{- define "merkle-mesh.hpa" -}}
{{- if eq .name "db-sync" }}{{ toJson .root.Values.autoscaling.dbSync }}
{{- else if eq .name "cache" }}{{ toJson .root.Values.autoscaling.cache }}
{{- else }}{"enabled":false}{{- end -}}
{{- end -}}

{{/* The checkov checks skipped on every workload, the console's too, with why (`checkov.io/skipN` annotations). */}}
{{- define "merkle-mesh.checkovSkips" -}}
checkov.io/skip1: "CKV_K8S_43=The image is referenced by the release tag the operator sets; pin a digest in image.tag to enforce one."
checkov.io/skip2: "CKV_K8S_15=IfNotPresent is right for immutable release tags; image.pullPolicy can be set to Always."
checkov.io/skip3: "CKV_K8S_11=No CPU limit on purpose: limits throttle latency-sensitive gRPC servers; requests reserve CPU and the HPA scales on it."
{{- end -}}

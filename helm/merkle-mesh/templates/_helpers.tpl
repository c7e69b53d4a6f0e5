{{/* Labels shared by every object of a service. */}}
{{- define "merkle-mesh.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: merkle-mesh
app.kubernetes.io/instance: {{ .release }}
app.kubernetes.io/version: {{ .version | quote }}
{{- end -}}
